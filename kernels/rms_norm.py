"""RMSNorm: y = x / sqrt(mean(x^2, -1) + eps) * weight (statistics in fp32, output in x.dtype).

Backward, with x_hat = x * rstd and g = dy * weight (all fp32):
    dx = rstd * (g - x_hat * mean(g * x_hat, -1))
    dweight = sum over rows of dy * x_hat        (reduced in fp32, cast to weight.dtype at the end)
"""
from __future__ import annotations

import torch

from kernels._dispatch import liger_module, resolve, rows_2d, tl, to_out, triton
from kernels.launch import Launch, Target, cdiv, next_power_of_2, target_of


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The spec and the CPU path. x: (..., D), weight: (D,)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
    return (xf * rstd * weight.float()).to(x.dtype)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, M, N, stride_x, stride_y, eps,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program normalises BLOCK_M rows; a row fits in one BLOCK_N tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)            # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)                                         # (BLOCK_N,)
    rmask, cmask = rows < M, cols < N
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)                      # (BLOCK_M,) fp32
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], to_out(y, Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, M, N, stride_dy, stride_x, stride_dx,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Persistent: program p handles row blocks p, p+G, p+2G, ... and writes its fp32 partial dweight."""
    pid, G = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, G * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / N                                  # (BLOCK_M,)
        dx = (g - x_hat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], to_out(dx, DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW_PART + pid * N + cols, dw, mask=cmask)


# ----------------------------------------------------------------------------- launch configs
MAX_WIDTH = 65536


def _tile(M: int, N: int, target: Target) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): a whole row per tile, several short rows per program. CUDA: 4,096
    elements per program whatever M is (one compiled variant per width); the interpreter: up to 65,536."""
    if N > MAX_WIDTH:
        raise ValueError(f"rms_norm: width {N} > {MAX_WIDTH} is not supported by the Triton kernel")
    BLOCK_N = next_power_of_2(N)
    if target.interpreted:
        BLOCK_M = max(1, min(65536 // BLOCK_N, next_power_of_2(M)))
    else:
        BLOCK_M = max(1, 4096 // BLOCK_N)
    return BLOCK_M, BLOCK_N, 8 if BLOCK_M * BLOCK_N >= 4096 else 4


def rms_norm_fwd_config(M: int, N: int, target: Target) -> Launch:
    """x: (M, N) rows -> the forward launch: one program per BLOCK_M rows."""
    BLOCK_M, BLOCK_N, num_warps = _tile(M, N, target)
    return Launch((cdiv(M, BLOCK_M),), dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N), num_warps)


def rms_norm_bwd_config(M: int, N: int, target: Target) -> Launch:
    """The backward launch: a persistent grid of 4 programs per SM (at most one per row block)."""
    BLOCK_M, BLOCK_N, num_warps = _tile(M, N, target)
    G = max(1, min(4 * target.num_sms, cdiv(M, BLOCK_M)))
    return Launch((G,), dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N), num_warps)


# ----------------------------------------------------------------------------- launchers
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, target: Target | None = None):
    """x: (..., D) -> y (same shape, x.dtype), rstd (M,) fp32, x2 (M, D) the rows it read.
    target: default the tensors' own (tests pass a GPU's to run its tiles in the interpreter)."""
    x2 = rows_2d(x)                                                      # (M, D)
    M, N = x2.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    launch = rms_norm_fwd_config(M, N, target or target_of(x2))
    launch(_rms_norm_fwd_kernel, x2, weight, y, rstd, M, N, x2.stride(0), y.stride(0), eps)
    return y.view(x.shape), rstd, x2


def rms_norm_bwd(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 target: Target | None = None):
    """dy: (..., D) -> dx (M, D) in x.dtype, dweight (D,) in weight.dtype (reduced in fp32)."""
    dy2 = rows_2d(dy)                                                    # (M, D)
    M, N = x2.shape
    dx = torch.empty_like(x2)
    launch = rms_norm_bwd_config(M, N, target or target_of(x2))
    dw_part = torch.empty((launch.grid[0], N), dtype=torch.float32, device=x2.device)  # (G, D) fp32 partials
    launch(_rms_norm_bwd_kernel, dy2, x2, weight, rstd, dx, dw_part, M, N, dy2.stride(0), x2.stride(0),
           dx.stride(0))
    return dx, dw_part.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------- autograd
class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd, x2 = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x2, weight, rstd)
        return dx.view(ctx.x_shape), dw, None


# ----------------------------------------------------------------------------- public
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """x: (..., D), weight: (D,). impl: auto | torch | triton | liger (see kernels/_dispatch.py)."""
    backend = resolve(impl, x, "rms_norm")
    if backend == "triton":
        return RMSNormFunction.apply(x, weight, eps)
    if backend == "liger":  # "gemma" casting with offset 0: everything in fp32, as the reference
        return liger_module().liger_rms_norm(x, weight, eps, offset=0.0, casting_mode="gemma", in_place=False)
    return rms_norm_ref(x, weight, eps)
