"""cross_entropy(h @ weight.T, targets) without materialising all N x V logits.

Rows are processed in chunks of C. For each chunk (n = valid rows in the whole batch):
    logits_c = h_c @ weight.T                              # (C, V)
    g_c      = d mean-loss / d logits_c                    # (C, V), from the cross-entropy math
    grad_h_c = g_c @ weight                                # (C, D)
    grad_w  += g_c.T @ h_c                                 # (V, D), accumulated in fp32
All gradients are computed during the forward; backward only scales them by the incoming scalar.
Peak extra memory is C x V (one chunk of logits) + grad_h + the fp32 grad_w accumulator, instead of
several N x V tensors. impl="triton" computes g_c with the cross-entropy kernel, in place in the chunk;
impl="torch" (the CPU path) does the same chunking with PyTorch ops.
"""
from __future__ import annotations

import torch

from kernels._dispatch import liger_module, resolve
from kernels.cross_entropy import cross_entropy_fwd, cross_entropy_ref


def fused_linear_cross_entropy_ref(h, weight, targets, ignore_index: int = -100, z_loss: float = 0.0):
    """h: (N, D), weight: (V, D), targets: (N,). The plain (materialising) definition: the test oracle."""
    return cross_entropy_ref(h @ weight.t(), targets, ignore_index, z_loss)


# ----------------------------------------------------------------------------- per-chunk loss + gradient
def _ce_chunk_torch(logits, targets, ignore_index, z_loss, n_valid, write_grad):
    """PyTorch version of the cross-entropy kernel. logits: (C, V) -> (loss rows (C,) fp32, grad in place)."""
    lf = logits.float()                                                  # (C, V) fp32 (a copy if low precision)
    lse = torch.logsumexp(lf, dim=-1)                                    # (C,)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    rows = torch.where(valid, lse - lf.gather(1, safe_t[:, None]).squeeze(1) + z_loss * lse * lse, 0.0)
    if not write_grad:
        return rows, None
    g = lf.sub_(lse[:, None]).exp_()                                     # softmax, in place (C, V)
    g.mul_((1.0 + 2.0 * z_loss * lse)[:, None])
    g[torch.arange(len(targets), device=g.device), safe_t] -= 1.0
    g.mul_((valid.float() / n_valid.clamp(min=1))[:, None])              # mean; ignored rows -> 0
    if g.dtype != logits.dtype:
        logits.copy_(g)
        g = logits
    return rows, g


def _ce_chunk_triton(logits, targets, ignore_index, z_loss, n_valid, write_grad):
    """The Triton kernel, writing the gradient over the chunk's logits (our own buffer)."""
    return cross_entropy_fwd(logits, targets, ignore_index, z_loss, n_valid, write_grad,
                             grad_out=logits if write_grad else None)


def default_chunk_size(n: int, d: int, v: int) -> int:
    """Rows per chunk: a chunk of logits about as large as h itself (C*V ~ N*D), a power of two,
    at least 64 rows so each matmul still fills the GPU."""
    c = 1 << (max(1, -(-n * d // v)) - 1).bit_length()                   # next power of two >= N*D/V
    return max(1, min(n, max(64, c)))


def flce_forward(h, weight, targets, ignore_index, z_loss, backend, grad_h_needed, grad_w_needed,
                 chunk_size=None):
    """Returns (loss fp32 scalar, grad_h (N, D) or None, grad_w (V, D) or None) for a mean loss."""
    N, D = h.shape
    V = weight.shape[0]
    chunk = chunk_size or default_chunk_size(N, D, V)
    ce_chunk = _ce_chunk_triton if backend == "triton" else _ce_chunk_torch
    n_valid = (targets != ignore_index).sum()                            # () int64, on device
    write_grad = grad_h_needed or grad_w_needed
    loss_rows = torch.empty(N, dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if grad_h_needed else None
    grad_w = torch.zeros((V, D), dtype=torch.float32, device=h.device) if grad_w_needed else None
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        h_c = h[s:e]                                                     # (C, D)
        logits = h_c @ weight.t()                                        # (C, D) @ (D, V) -> (C, V)
        loss_rows[s:e], g = ce_chunk(logits, targets[s:e], ignore_index, z_loss, n_valid, write_grad)
        if grad_h_needed:
            grad_h[s:e] = g @ weight                                     # (C, V) @ (V, D) -> (C, D)
        if grad_w_needed:
            if g.dtype == torch.float32 and h_c.dtype == torch.float32:
                grad_w.addmm_(g.t(), h_c)                                # (V, C) @ (C, D) -> (V, D)
            else:
                grad_w.add_(g.t() @ h_c)                                 # low-precision product, fp32 sum
        del logits, g
    loss = loss_rows.sum() / n_valid.clamp(min=1)
    return loss, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


# ----------------------------------------------------------------------------- autograd
class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, z_loss, backend, chunk_size=None):
        loss, grad_h, grad_w = flce_forward(h, weight, targets, ignore_index, z_loss, backend,
                                            ctx.needs_input_grad[0], ctx.needs_input_grad[1], chunk_size)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, dloss):
        if ctx.used:  # the stored gradients are scaled in place below
            raise RuntimeError("kernels.fused_linear_cross_entropy: backward can run only once per forward")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h.mul_(dloss.to(grad_h.dtype)) if grad_h is not None else None
        grad_w = grad_w.mul_(dloss.to(grad_w.dtype)) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None


# ----------------------------------------------------------------------------- public
def fused_linear_cross_entropy(h, weight, targets, ignore_index: int = -100, z_loss: float = 0.0,
                               impl: str = "auto"):
    """h: (N, D), weight: (V, D), targets: (N,). impl: auto | torch | triton | liger.
    "torch" and "triton" both chunk (the torch path is the memory-efficient CPU path); the materialising
    definition is `fused_linear_cross_entropy_ref`."""
    backend = resolve(impl, h, "fused_linear_cross_entropy")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: expected h (N, D), weight (V, D), targets (N,); got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if backend == "liger":
        return liger_module().liger_fused_linear_cross_entropy(h, weight, targets, ignore_index=ignore_index,
                                                               lse_square_scale=z_loss).float()
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        return flce_forward(h, weight, targets, ignore_index, z_loss, backend, False, False)[0]
    return FusedLinearCrossEntropyFunction.apply(h, weight, targets, ignore_index, z_loss, backend)
