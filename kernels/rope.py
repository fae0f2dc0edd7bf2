"""Rotary position embedding, rotate-half convention (as Hugging Face Llama).

out[..., :D/2] = x1*cos - x2*sin ; out[..., D/2:] = x2*cos + x1*sin  (x1, x2 = the two halves)
"""
from __future__ import annotations

import torch


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos, sin: (T, D//2) fp32. Math in fp32, output in x.dtype."""
    d2 = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :d2], xf[..., d2:]          # (B, T, H, D/2) each
    c = cos[None, :, None, :]                      # (1, T, 1, D/2)
    s = sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    return apply_rope_ref(x, cos, sin)
