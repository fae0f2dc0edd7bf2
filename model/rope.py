"""RoPE frequency tables, with optional context-extension scaling (linear, NTK, YaRN)."""
from __future__ import annotations

import math

import torch

from model.config import GPTConfig


def rope_inv_freq(cfg: GPTConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq of shape (head_dim/2,) in fp32, attention scale applied to cos/sin)."""
    d = cfg.head_dim
    theta, s = cfg.rope_theta, cfg.rope_factor
    exponents = torch.arange(0, d, 2, dtype=torch.float64) / d          # (d/2,)
    if cfg.rope_scaling == "ntk":
        # "NTK-aware" static scaling: stretch the base so the lowest frequency covers s x the context.
        theta = theta * s ** (d / (d - 2))
    inv_freq = 1.0 / theta ** exponents                                 # (d/2,)
    scale = 1.0
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / s                                          # position interpolation
    elif cfg.rope_scaling == "yarn":
        # YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, ramp in between.
        # Dim i rotates L / (2 pi / inv_freq_i) times over the original context L; dims rotating
        # more than beta_fast=32 times are kept, fewer than beta_slow=1 times are interpolated.
        orig = cfg.rope_original_max_seq_len or cfg.max_seq_len

        def dim_for_rotations(r):
            return d * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        lo = max(math.floor(dim_for_rotations(32.0)), 0)
        hi = min(math.ceil(dim_for_rotations(1.0)), d - 1)
        hi = hi + 0.001 if hi == lo else hi
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        keep = 1.0 - ramp                                                # 1 = extrapolate (keep)
        inv_freq = (inv_freq / s) * (1 - keep) + inv_freq * keep
        scale = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
    return inv_freq.float(), scale


def rope_tables(cfg: GPTConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (seq_len, head_dim/2) fp32 for positions 0..seq_len-1."""
    inv_freq, scale = rope_inv_freq(cfg)
    pos = torch.arange(seq_len, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)                                 # (T, d/2)
    cos, sin = angles.cos() * scale, angles.sin() * scale
    return cos.to(device), sin.to(device)
