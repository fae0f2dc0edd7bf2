"""Knowledge-distillation loss from two models' hidden states, without materialising either model's N x V logits.

Per target token i (targets != ignore_index; n of them), with student logits s_i = h_i @ W.T and teacher
logits t_i = ht_i @ Wt.T:
    loss = 1/n * sum_i [ (1 - alpha) * CE(s_i, y_i) + alpha * T^2 * KL(softmax(t_i / T) || softmax(s_i / T)) ]
    d loss / d s_i = 1/n * [ (1 - alpha) * (softmax(s_i) - onehot(y_i)) + alpha * T * (softmax(s_i / T) - softmax(t_i / T)) ]
(the T^2 factor keeps the KL gradient's scale independent of T: Hinton et al. 2015). The teacher gets no
gradient. As kernels/fused_linear_cross_entropy.py does, rows go in chunks of C: per chunk both (C, V) logits
exist, the gradient is written in place, and grad_h = g @ W and grad_W += g.T @ h are done in the forward, so
peak extra memory is a few C x V fp32 buffers + grad_h + the fp32 grad_W, instead of several N x V tensors
for each model. (Liger-Kernel's fused linear JSD follows the same plan.) `fused_linear_distill_ref` is the
plain materialising definition: the spec and the test oracle. CPU and GPU run the same PyTorch chunk math.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.fused_linear_cross_entropy import default_chunk_size


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 at least (fp64 inputs stay fp64: the tests' exact oracle)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def fused_linear_distill_ref(h, weight, h_teacher, w_teacher, targets, alpha: float = 0.5,
                             temperature: float = 1.0, ignore_index: int = -100):
    """h: (N, D), weight: (V, D), h_teacher: (N, Dt), w_teacher: (V, Dt), targets: (N,). Materialises
    both (N, V) logits."""
    s = _acc(h @ weight.t())                                              # (N, V)
    t = _acc(h_teacher @ w_teacher.t())                                   # (N, V)
    valid = targets != ignore_index
    s, t, y = s[valid], t[valid], targets[valid]                          # (n, V), (n, V), (n,)
    ce = F.cross_entropy(s, y, reduction="none")                          # (n,)
    T = temperature
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                  reduction="none").sum(-1)                               # (n,)
    return ((1 - alpha) * ce + alpha * T * T * kl).sum() / valid.sum().clamp(min=1)


def _chunk(s, t, targets, alpha, T, ignore_index, n_valid, write_grad):
    """s, t: (C, V) fp32 logits (s is overwritten with the gradient) -> (loss rows (C,), grad or None)."""
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(s, -1)                                          # (C,)
    ce = lse - s.gather(1, safe_t[:, None]).squeeze(1)                    # (C,)
    t.div_(T)
    logp = t.sub_(torch.logsumexp(t, -1, keepdim=True))                   # log softmax(t / T), in place (C, V)
    sT = s / T                                                            # (C, V)
    logq = sT.sub_(torch.logsumexp(sT, -1, keepdim=True))                 # log softmax(s / T), in place
    p = logp.exp()                                                        # (C, V)
    kl = (p * (logp - logq)).sum(-1)                                      # (C,)
    rows = torch.where(valid, (1 - alpha) * ce + alpha * T * T * kl, 0.0)
    if not write_grad:
        return rows, None
    g = s.sub_(lse[:, None]).exp_().mul_(1 - alpha)                       # (1-a) softmax(s), in place
    g[torch.arange(len(targets), device=g.device), safe_t] -= 1 - alpha
    g.add_(logq.exp_().sub_(p), alpha=alpha * T)                          # + a T (q_T - p_T)
    g.mul_((valid.to(g.dtype) / n_valid.clamp(min=1))[:, None])               # mean; ignored rows -> 0
    return rows, g


def fld_forward(h, weight, h_teacher, w_teacher, targets, alpha, temperature, ignore_index, grad_h_needed,
                grad_w_needed, chunk_size=None):
    """-> (loss fp32 scalar, grad_h (N, D) or None, grad_w (V, D) or None) of the mean loss."""
    N, D = h.shape
    V = weight.shape[0]
    chunk = chunk_size or default_chunk_size(N, D, V)
    n_valid = (targets != ignore_index).sum()                             # () int64
    write_grad = grad_h_needed or grad_w_needed
    acc = _acc(h[:0]).dtype
    loss_rows = torch.empty(N, dtype=acc, device=h.device)
    grad_h = torch.empty_like(h) if grad_h_needed else None
    grad_w = torch.zeros((V, D), dtype=acc, device=h.device) if grad_w_needed else None
    for a in range(0, N, chunk):
        e = min(N, a + chunk)
        h_c = h[a:e]                                                      # (C, D)
        s = _acc(h_c @ weight.t())                                        # (C, V)
        t = _acc(h_teacher[a:e] @ w_teacher.t()).to(s.dtype)              # (C, V)
        loss_rows[a:e], g = _chunk(s, t, targets[a:e], alpha, temperature, ignore_index, n_valid, write_grad)
        del t
        if grad_h_needed:
            grad_h[a:e] = (g.to(weight.dtype) @ weight).to(h.dtype)       # (C, V) @ (V, D) -> (C, D)
        if grad_w_needed:
            grad_w.addmm_(g.t(), h_c.to(acc))                             # (V, C) @ (C, D) -> (V, D)
        del s, g
    loss = loss_rows.sum() / n_valid.clamp(min=1)
    return loss, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


class FusedLinearDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, h_teacher, w_teacher, targets, alpha, temperature, ignore_index, chunk_size):
        loss, grad_h, grad_w = fld_forward(h, weight, h_teacher, w_teacher, targets, alpha, temperature,
                                           ignore_index, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                           chunk_size)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * dloss.to(grad_h.dtype) if grad_h is not None else None
        grad_w = grad_w * dloss.to(grad_w.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None, None, None


def fused_linear_distill(h, weight, h_teacher, w_teacher, targets, alpha: float = 0.5, temperature: float = 1.0,
                         ignore_index: int = -100, chunk_size: int | None = None):
    """The chunked distillation loss (see the module docstring); the teacher's inputs get no gradient."""
    if (h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]
            or h_teacher.shape[0] != h.shape[0] or w_teacher.shape != (weight.shape[0], h_teacher.shape[1])):
        raise ValueError(f"fused_linear_distill: expected h (N, D), weight (V, D), h_teacher (N, Dt), w_teacher "
                         f"(V, Dt), targets (N,); got {tuple(h.shape)}, {tuple(weight.shape)}, "
                         f"{tuple(h_teacher.shape)}, {tuple(w_teacher.shape)}, {tuple(targets.shape)}")
    h_teacher, w_teacher = h_teacher.detach(), w_teacher.detach()
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        return fld_forward(h, weight, h_teacher, w_teacher, targets, alpha, temperature, ignore_index, False,
                           False, chunk_size)[0]
    return FusedLinearDistillFunction.apply(h, weight, h_teacher, w_teacher, targets, alpha, temperature,
                                            ignore_index, chunk_size)
