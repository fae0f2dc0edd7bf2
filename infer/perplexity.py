"""Perplexity on a data folder's validation shards (data/prepare.py output or llm.c-style *val_*.bin)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.loader import check_tokenizer_match, folder_manifest
from data.shards import read_shard
from kernels.common import FurnaceError
from model.gpt import GPT


@torch.inference_mode()
def val_perplexity(model: GPT, data_dir: str, tokenizer=None, seq_len: int | None = None,
                   max_tokens: int | None = None, batch_size: int = 8) -> dict:
    """The val tokens, concatenated, are cut into windows of seq_len + 1 tokens that overlap by one, so every
    token but the very first is predicted exactly once, with the context of its window. Returns
    {"ppl", "loss" (mean nats/token), "tokens" (predicted), "seq_len", "shards"}."""
    d = Path(data_dir)
    manifest = folder_manifest(d)
    if tokenizer is not None:
        check_tokenizer_match(manifest.get("tokenizer_sha256"), tokenizer.sha256, f"data folder {d}", "the checkpoint")
    files = [d / e["file"] for e in manifest["shards"].get("val") or []]
    if not files:
        raise FurnaceError(f"--ppl {d}: the folder has no validation shards (prepare it with data/prepare.py)")
    T = seq_len or model.config.max_seq_len
    if not 1 <= T <= model.config.max_seq_len:
        raise FurnaceError(f"--ppl-seq-len {T}: expected 1..{model.config.max_seq_len} (the model's context)")
    V = model.config.vocab_size
    tokens = np.concatenate([np.asarray(read_shard(f)) for f in files])
    if max_tokens:
        tokens = tokens[:max_tokens + 1]
    if len(tokens) < 2:
        raise FurnaceError(f"--ppl {d}: validation shards hold {len(tokens)} token(s); need at least 2")
    if int(tokens.max()) >= V:
        raise FurnaceError(f"--ppl {d}: token id {int(tokens.max())} is outside the model's vocabulary ({V})")
    starts = list(range(0, len(tokens) - 1, T))
    device = model.embed.weight.device
    nll, count = 0.0, 0
    for b in range(0, len(starts), batch_size):
        group = [tokens[s:s + T + 1] for s in starts[b:b + batch_size]]
        for n in sorted({len(w) for w in group}):          # full windows batch together; the last may be short
            win = torch.from_numpy(np.stack([w for w in group if len(w) == n]).astype(np.int64)).to(device)  # (B, n)
            nll += _sum_nll(model, win[:, :-1], win[:, 1:])
            count += win.shape[0] * (n - 1)
    loss = nll / count
    return {"ppl": math.exp(loss), "loss": loss, "tokens": count, "seq_len": T, "shards": [f.name for f in files]}


def _sum_nll(model: GPT, x: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> float:
    """Summed next-token NLL; the LM head runs on `chunk` positions at a time (bounded memory, and it works
    for int8 heads, which the fused training loss does not take)."""
    h = model.hidden_states(x)                                                 # (B, T, d)
    total = 0.0
    for r in range(h.shape[0]):
        for s in range(0, h.shape[1], chunk):
            logits = model.lm_head(h[r, s:s + chunk]).float()                  # (c, V)
            total += F.cross_entropy(logits, y[r, s:s + chunk], reduction="sum").item()
    return total
