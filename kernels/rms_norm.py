"""RMSNorm: y = x / sqrt(mean(x^2, -1) + eps) * weight (statistics in fp32, output in x.dtype)."""
from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The spec and the CPU path. x: (..., D), weight: (D,)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
    return (xf * rstd * weight.float()).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    return rms_norm_ref(x, weight, eps)
