"""Cross-entropy with ignore_index and z-loss, mean over non-ignored rows."""
from __future__ import annotations

import torch


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


def cross_entropy(logits, targets, ignore_index: int = -100, z_loss: float = 0.0, impl: str = "auto"):
    return cross_entropy_ref(logits, targets, ignore_index, z_loss)
