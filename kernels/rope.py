"""Rotary position embedding, rotate-half convention (as Hugging Face Llama).

out[..., :D/2] = x1*cos - x2*sin ; out[..., D/2:] = x2*cos + x1*sin  (x1, x2 = the two halves)

It is a rotation of each pair (x1_i, x2_i) by angle theta_{t,i}, so the backward is the same kernel
rotating by -theta (sin -> -sin):  dx1 = dy1*cos + dy2*sin ; dx2 = dy2*cos - dy1*sin.
Gradients for cos/sin (rarely needed: the model's tables are buffers) are sums over batch and heads:
dcos = sum(dy1*x1 + dy2*x2), dsin = sum(dy2*x1 - dy1*x2).
"""
from __future__ import annotations

import torch

from kernels._dispatch import liger_module, resolve, tl, to_out, triton
from kernels.launch import Launch, Target, cdiv, next_power_of_2, target_of


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos, sin: (T, D//2) fp32. Math in fp32, output in x.dtype."""
    d2 = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :d2], xf[..., d2:]          # (B, T, H, D/2) each
    c = cos[None, :, None, :]                      # (1, T, 1, D/2)
    s = sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _rope_kernel(X, COS, SIN, Y, DCS, DYX, R, T, H, D2,
                 sxb, sxt, sxh, sxd, syb, syt, syh, syd, sct, sst,
                 BACKWARD: tl.constexpr, CS_GRAD: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program = BLOCK_R positions r = b*T + t, all heads, both halves. X is x (forward) or dy
    (backward, sin -> -sin). With CS_GRAD, DYX is the forward input x (same strides as X) and each
    position's (cos, sin) gradient, summed over heads, goes to DCS[r] (summed over b by the launcher)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)                # (BLOCK_R,)
    rmask = r < R
    b, t = (r // T).to(tl.int64), r % T
    r3 = (b * sxb + t * sxt)[:, None, None]                              # (BLOCK_R, 1, 1)
    h = tl.arange(0, BLOCK_H)[None, :, None]                             # (1, BLOCK_H, 1)
    d = tl.arange(0, BLOCK_D)[None, None, :]                             # (1, 1, BLOCK_D)
    mask = rmask[:, None, None] & (h < H) & (d < D2)
    xp = X + r3 + h * sxh
    x1 = tl.load(xp + d * sxd, mask=mask, other=0.0).to(tl.float32)      # (BLOCK_R, BLOCK_H, BLOCK_D)
    x2 = tl.load(xp + (d + D2) * sxd, mask=mask, other=0.0).to(tl.float32)
    cmask = rmask[:, None, None] & (d < D2)
    c = tl.load(COS + (t * sct)[:, None, None] + d, mask=cmask, other=0.0).to(tl.float32)  # (BLOCK_R, 1, BLOCK_D)
    s = tl.load(SIN + (t * sst)[:, None, None] + d, mask=cmask, other=0.0).to(tl.float32)
    if BACKWARD:
        s = -s
    yp = Y + (b * syb + t * syt)[:, None, None] + h * syh
    tl.store(yp + d * syd, to_out(x1 * c - x2 * s, Y.dtype.element_ty), mask=mask)
    tl.store(yp + (d + D2) * syd, to_out(x2 * c + x1 * s, Y.dtype.element_ty), mask=mask)
    if CS_GRAD:  # here x1, x2 hold dy1, dy2
        xq = DYX + r3 + h * sxh
        a1 = tl.load(xq + d * sxd, mask=mask, other=0.0).to(tl.float32)
        a2 = tl.load(xq + (d + D2) * sxd, mask=mask, other=0.0).to(tl.float32)
        dcos = tl.sum(x1 * a1 + x2 * a2, axis=1)                          # (BLOCK_R, BLOCK_D)
        dsin = tl.sum(x2 * a1 - x1 * a2, axis=1)
        dd = tl.arange(0, BLOCK_D)[None, :]
        base = DCS + r.to(tl.int64)[:, None] * 2 * D2 + dd
        m2 = rmask[:, None] & (dd < D2)
        tl.store(base, dcos, mask=m2)
        tl.store(base + D2, dsin, mask=m2)


# ----------------------------------------------------------------------------- launch configs
def rope_config(R: int, H: int, D2: int, target: Target, backward: bool = False, cs_grad: bool = False) -> Launch:
    """R = B*T positions, H heads, D2 = head_dim/2. Half-tiles of 2,048 elements on CUDA whatever R is (one
    compiled variant per head shape), up to 32,768 in the interpreter."""
    BLOCK_H, BLOCK_D = next_power_of_2(H), next_power_of_2(D2)
    if target.interpreted:
        BLOCK_R = max(1, min((1 << 15) // (BLOCK_H * BLOCK_D), next_power_of_2(R)))
    else:
        BLOCK_R = max(1, 2048 // (BLOCK_H * BLOCK_D))
    # 8 warps from 2,048-element half-tiles: with 4, fp32 on sm_90 spilled (bench/kernel_compile.py)
    num_warps = 8 if BLOCK_R * BLOCK_H * BLOCK_D >= 2048 else 4
    return Launch((cdiv(R, BLOCK_R),), dict(BACKWARD=backward, CS_GRAD=cs_grad, BLOCK_R=BLOCK_R,
                                            BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D), num_warps=num_warps)


# ----------------------------------------------------------------------------- launchers
def rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False,
                x_saved: torch.Tensor | None = None, target: Target | None = None):
    """Rotate x (B, T, H, D) by +theta (forward) or -theta (backward, x = dy). Returns a contiguous
    (B, T, H, D) tensor; with x_saved (the forward input, backward only) also the fp32 (T, D/2) grads of
    cos and sin."""
    B, T, H, D = x.shape
    D2 = D // 2
    if x_saved is not None:  # the cos/sin reduction reads dy and x with the same strides
        x, x_saved = x.contiguous(), x_saved.contiguous()
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    dcs = (torch.empty((B, T, 2, D2), dtype=torch.float32, device=x.device)  # (B, T, [cos|sin], D/2)
           if x_saved is not None else y)
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    launch = rope_config(B * T, H, D2, target or target_of(x), backward, x_saved is not None)
    launch(_rope_kernel, x, cos, sin, y, dcs, x_saved if x_saved is not None else x, B * T, T, H, D2,
           *x.stride(), *y.stride(), cos.stride(0), sin.stride(0))
    if x_saved is None:
        return y, None, None
    dcs = dcs.sum(0)                                                      # (T, 2, D/2) fp32
    return y, dcs[:, 0], dcs[:, 1]


# ----------------------------------------------------------------------------- autograd
class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        y, _, _ = rope_launch(x, cos, sin)
        cs_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(cos, sin, x if cs_grad else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        cos, sin, x = ctx.saved_tensors
        dx, dcos, dsin = rope_launch(dy, cos, sin, backward=True, x_saved=x)
        if dcos is not None:
            dcos, dsin = dcos.to(cos.dtype), dsin.to(sin.dtype)
        return dx, dcos, dsin


# ----------------------------------------------------------------------------- public
def _liger_rope(x, cos, sin):
    """liger_rope rotates q and k in (B, H, T, D) with full-width (T, D) tables; we pass x as q and a
    one-head slice of it as k, and keep q."""
    xt = x.transpose(1, 2)                                                # (B, H, T, D)
    cos_f, sin_f = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]  # (1, T, D)
    q, _ = liger_module().liger_rope(xt.contiguous(), xt[:, :1].contiguous(), cos_f, sin_f)
    return q.transpose(1, 2)                                              # (B, T, H, D)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x: (B, T, H, D); cos, sin: (T, D//2). impl: auto | torch | triton | liger."""
    backend = resolve(impl, x, "apply_rope")
    if backend == "torch":
        return apply_rope_ref(x, cos, sin)
    B, T, H, D = x.shape
    if D % 2 or tuple(cos.shape) != (T, D // 2) or tuple(sin.shape) != (T, D // 2):
        raise ValueError(f"apply_rope: x {tuple(x.shape)} needs cos/sin of shape ({T}, {D // 2}) and an even D; "
                         f"got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if backend == "liger":
        return _liger_rope(x, cos, sin)
    return RoPEFunction.apply(x, cos, sin)
