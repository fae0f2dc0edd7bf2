"""cross_entropy(h @ weight.T, targets) without materialising all N x V logits."""
from __future__ import annotations

import torch

from kernels.cross_entropy import cross_entropy_ref


def fused_linear_cross_entropy_ref(h, weight, targets, ignore_index: int = -100, z_loss: float = 0.0):
    """h: (N, D), weight: (V, D), targets: (N,). The plain (materialising) definition."""
    return cross_entropy_ref(h @ weight.t(), targets, ignore_index, z_loss)


def fused_linear_cross_entropy(h, weight, targets, ignore_index: int = -100, z_loss: float = 0.0,
                               impl: str = "auto"):
    return fused_linear_cross_entropy_ref(h, weight, targets, ignore_index, z_loss)
