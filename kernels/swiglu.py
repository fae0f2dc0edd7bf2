"""SwiGLU gate: silu(gate) * up.

Backward, with s = sigmoid(gate) (all fp32):
    dgate = dy * up * s * (1 + gate * (1 - s))      d silu(g)/dg = s + g*s*(1-s)
    dup   = dy * gate * s                           silu(g) = g * s
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import liger_module, resolve, tl, to_out, triton
from kernels.launch import Launch, Target, cdiv, target_of


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: (..., H). Computed in fp32, returned in gate.dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, to_out(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DG + offs, to_out(dy * u * s * (1.0 + g * (1.0 - s)), DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, to_out(dy * g * s, DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch configs
def swiglu_config(n: int, target: Target) -> Launch:
    """n elements, flat: 1,024 per program on CUDA; the interpreter runs one program at a time: 65,536."""
    BLOCK = 1 << 16 if target.interpreted else 1024
    return Launch((cdiv(n, BLOCK),), dict(BLOCK=BLOCK), num_warps=4)


# ----------------------------------------------------------------------------- launchers
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, target: Target | None = None) -> torch.Tensor:
    g, u = gate.contiguous(), up.contiguous()      # elementwise over the flat buffer
    y = torch.empty(g.shape, dtype=gate.dtype, device=g.device)
    swiglu_config(g.numel(), target or target_of(g))(_swiglu_fwd_kernel, g, u, y, g.numel())
    return y


def swiglu_bwd(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, target: Target | None = None):
    dy = dy.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    swiglu_config(g.numel(), target or target_of(g))(_swiglu_bwd_kernel, dy, g, u, dg, du, g.numel())
    return dg, du


# ----------------------------------------------------------------------------- autograd
class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(g, u)
        return swiglu_fwd(g, u)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        return swiglu_bwd(dy, g, u)


# ----------------------------------------------------------------------------- public
def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """gate, up: (..., H) of the same shape and dtype. impl: auto | torch | triton | liger."""
    backend = resolve(impl, gate, "swiglu")
    if backend == "torch":
        return swiglu_ref(gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have the same shape and dtype")
    if backend == "liger":
        return liger_module().liger_swiglu(gate, up)
    return SwiGLUFunction.apply(gate, up)
