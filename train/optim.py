"""AdamW with decay only on matmul weights, and the learning-rate schedules."""
from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device_type: str) -> torch.optim.AdamW:
    """AdamW(betas 0.9/0.95); no weight decay on norms, biases and embeddings (a tied LM head is the
    embedding, so it is not decayed either). Fused on CUDA."""
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embed_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=(device_type == "cuda"))


def lr_at(step: int, max_steps: int, lr: float, min_lr: float, warmup: int, schedule: str,
          wsd_decay: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then
    cosine: min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2;
    wsd: constant lr, then a linear decay to min_lr over the last `wsd_decay` fraction of steps;
    constant: lr."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_start = int(max_steps * (1 - wsd_decay))
        if step < decay_start:
            return lr
        frac = (step - decay_start) / max(1, max_steps - decay_start)
        return lr + (min_lr - lr) * min(frac, 1.0)
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
