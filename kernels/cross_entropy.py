"""Cross-entropy with ignore_index and z-loss, mean over non-ignored rows.

Per valid row (lse = logsumexp(x), p = softmax(x), t = target, n = number of valid rows):
    loss_row = lse - x[t] + z * lse^2
    d loss / d x_j = (p_j * (1 + 2 z lse) - [j == t]) / n          (0 for ignored rows)
The Triton kernel finds lse in one online pass (running max and rescaled sum) and writes the
gradient in a second pass over the same row during the forward, so backward never recomputes a
softmax: it only scales the stored gradient by the incoming scalar.
"""
from __future__ import annotations

import torch

from kernels._dispatch import liger_module, resolve, tl, to_out, triton
from kernels.launch import Launch, Target, cdiv, next_power_of_2, target_of


def cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                      z_loss: float = 0.0) -> torch.Tensor:
    """logits: (N, V), targets: (N,). Returns the fp32 scalar
    mean over rows with target != ignore_index of (lse - logit[target] + z_loss * lse^2);
    0 (with zero gradients) when every row is ignored."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)                                   # (N,)
    valid = targets != ignore_index                                     # (N,)
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    tgt = lf.gather(1, safe_t[:, None]).squeeze(1)                      # (N,)
    per_row = lse - tgt + z_loss * lse * lse
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return per_row.sum() / valid.sum().clamp(min=1)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _cross_entropy_fwd_kernel(X, TGT, LOSS, DX, N_VALID, N, V, stride_x, stride_dx, ignore_index, z_loss,
                              WRITE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per BLOCK_N rows (1 for large vocabularies on a GPU). Pass 1: online max / sum-exp ->
    lse and the rows' losses. Pass 2 (WRITE_GRAD): the gradient of the mean loss, written to DX (which
    may alias X: each element is read before it is overwritten, by the same program)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)           # (BLOCK_N,)
    rmask = rows < N
    rows = tl.minimum(rows, N - 1).to(tl.int64)                          # tail rows redo row N-1, unstored
    x_rows = X + rows[:, None] * stride_x                                # (BLOCK_N, 1) pointers
    t = tl.load(TGT + rows)
    valid = t != ignore_index
    t_safe = tl.where(valid, t, 0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)                   # running max
    d = tl.zeros((BLOCK_N,), tl.float32)                                 # running sum of exp(x - m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)[None, :]                    # (1, BLOCK_V)
        x = tl.load(x_rows + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))                         # finite: every block has a column
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(d)                                                  # (BLOCK_N,) fp32
    x_t = tl.load(X + rows * stride_x + t_safe).to(tl.float32)
    tl.store(LOSS + rows, tl.where(valid, lse - x_t + z_loss * lse * lse, 0.0), mask=rmask)
    if WRITE_GRAD:
        n = tl.load(N_VALID).to(tl.float32)
        scale = tl.where(valid, 1.0 / tl.maximum(n, 1.0), 0.0)[:, None]  # ignored rows: exact zeros
        coef = (1.0 + 2.0 * z_loss * lse)[:, None]
        dx_rows = DX + rows[:, None] * stride_dx
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)[None, :]
            mask = rmask[:, None] & (cols < V)
            x = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse[:, None]) * coef - tl.where(cols == t_safe[:, None], 1.0, 0.0)
            g = tl.where(scale != 0.0, g * scale, 0.0)
            tl.store(dx_rows + cols, to_out(g, DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch configs
def cross_entropy_config(N: int, V: int, target: Target, write_grad: bool = True) -> Launch:
    """N rows of V logits. CUDA: tiles of 4,096 logits (one row per program from V = 4,096 up, several
    short rows below), whatever N is; the interpreter: up to 65,536 per tile, 16,384 per row."""
    if target.interpreted:
        BLOCK_V = min(next_power_of_2(V), 16384)
        BLOCK_N = max(1, min((1 << 16) // BLOCK_V, next_power_of_2(max(N, 1))))
    else:
        BLOCK_V = min(next_power_of_2(V), 4096)
        BLOCK_N = max(1, 4096 // BLOCK_V)
    return Launch((cdiv(N, BLOCK_N),), dict(WRITE_GRAD=write_grad, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V),
                  num_warps=8 if BLOCK_N * BLOCK_V >= 2048 else 4)


# ----------------------------------------------------------------------------- launchers
def cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, z_loss: float,
                      n_valid: torch.Tensor, write_grad: bool, grad_out: torch.Tensor | None = None,
                      target: Target | None = None):
    """logits: (N, V) with unit stride along V; n_valid: int tensor () = rows counted by the mean (it may
    cover more rows than these, as in the chunked linear+CE). Writes the gradient into grad_out
    (N, V) (default: a new tensor; `logits` itself for in-place) when write_grad.
    Returns (per-row losses (N,) fp32, gradient or None)."""
    N, V = logits.shape
    loss_rows = torch.empty(N, dtype=torch.float32, device=logits.device)
    grad = None
    if write_grad:
        grad = grad_out if grad_out is not None else torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N:
        launch = cross_entropy_config(N, V, target or target_of(logits), write_grad)
        launch(_cross_entropy_fwd_kernel, logits, targets, loss_rows, grad if grad is not None else logits,
               n_valid, N, V, logits.stride(0), grad.stride(0) if grad is not None else 0, ignore_index, z_loss)
    return loss_rows, grad


def _unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ----------------------------------------------------------------------------- autograd
class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, z_loss):
        x = _unit_stride_rows(logits)                                   # (N, V), any row stride
        n_valid = (targets != ignore_index).sum()                       # () int64, stays on device
        loss_rows, grad = cross_entropy_fwd(x, targets, ignore_index, z_loss, n_valid,
                                            write_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        ctx.used = False
        return loss_rows.sum() / n_valid.clamp(min=1)

    @staticmethod
    def backward(ctx, dloss):
        if ctx.used:  # the stored gradient is scaled in place below
            raise RuntimeError("kernels.cross_entropy (triton): backward can run only once per forward")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(dloss.to(grad.dtype)), None, None, None


# ----------------------------------------------------------------------------- public
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, z_loss: float = 0.0,
                  impl: str = "auto") -> torch.Tensor:
    """logits: (N, V), targets: (N,) int. impl: auto | torch | triton | liger."""
    backend = resolve(impl, logits, "cross_entropy")
    if backend == "torch":
        return cross_entropy_ref(logits, targets, ignore_index, z_loss)
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} must be (N, V) and targets "
                         f"{tuple(targets.shape)} must be (N,)")
    if backend == "liger":
        return liger_module().liger_cross_entropy(logits, targets, ignore_index=ignore_index,
                                                  lse_square_scale=z_loss).float()
    return CrossEntropyFunction.apply(logits, targets, ignore_index, z_loss)
