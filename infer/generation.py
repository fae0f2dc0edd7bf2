"""Autoregressive generation with a preallocated KV cache.

Prefill runs the whole prompt once; each decode step feeds one token and reads the cache. Without the
cache every step recomputes the whole sequence (the reference the tests compare against).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from infer.decode import Decoder
from infer.sampling import SamplingParams, next_token
from model.gpt import GPT, KVCache

log = logging.getLogger("furnace")


def context_len(model: GPT) -> int:
    return model.config.max_seq_len


def fit_prompt(prompt_ids: Sequence[int], max_len: int) -> tuple[list[int], int]:
    """Keep the last `max_len` ids. Returns (ids, number dropped from the left)."""
    ids = list(prompt_ids)
    drop = max(0, len(ids) - max_len)
    return ids[drop:], drop


@torch.inference_mode()
def generate(model: GPT, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             stop_ids: Sequence[int] = (), use_cache: bool = True, seed: int | None = None,
             on_token: Callable[[int], None] | None = None, cache: KVCache | None = None,
             decoder: Decoder | None = None) -> list[int]:
    """Generate up to `max_new_tokens` tokens after `prompt_ids`; returns the new tokens (a stop token that
    ended generation is included). Stops early at a stop id or when the context is full.

    A prompt longer than the context keeps its last tokens (logged). `cache` (optional, for multi-turn
    reuse): a KV cache whose first `cache.pos` positions already hold `prompt_ids[:cache.pos]`; only the rest
    is prefilled. `on_token(id)` is called for every new token as soon as it is chosen (streaming); an
    exception it raises (e.g. KeyboardInterrupt) stops generation and propagates. `decoder`: the model's
    Decoder (infer/decode.py; with a compiled step), default an eager one.
    """
    decoder = decoder or Decoder(model)
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    T_max = context_len(model)
    ids, dropped = fit_prompt(prompt_ids, T_max - 1)
    if dropped:
        log.warning(f"prompt of {len(prompt_ids)} tokens exceeds the context ({T_max}); kept the last {len(ids)}")
    if not ids:
        raise ValueError("generate: empty prompt (give at least one token, e.g. the end-of-text id)")
    max_new_tokens = min(max_new_tokens, T_max - len(ids))
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
    device = model.embed.weight.device
    stops = frozenset(int(s) for s in stop_ids)
    penalise = params.repetition_penalty != 1.0
    seen = torch.tensor(ids, dtype=torch.long) if penalise else None
    out: list[int] = []
    if max_new_tokens <= 0:
        return out

    if use_cache:
        if cache is None or dropped:
            cache = model.new_cache(1, T_max)
        start = min(cache.pos, len(ids) - 1)                            # always feed >= 1 token
        cache.pos = start
        x = torch.tensor([ids[start:]], dtype=torch.long, device=device)  # (1, T)
        logits = decoder.last_logits(x, cache)
    else:
        logits = decoder.last_logits(torch.tensor([ids], dtype=torch.long, device=device), None)
    while True:
        tok = next_token(logits.cpu() if logits.device.type != "cpu" else logits, params, seen, gen)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in stops or len(out) >= max_new_tokens:
            return out
        if penalise:
            seen = torch.cat([seen, torch.tensor([tok])])
        if use_cache:
            x = torch.tensor([[tok]], dtype=torch.long, device=device)   # (1, 1)
            logits = decoder.last_logits(x, cache)
        else:
            full = torch.tensor([ids + out], dtype=torch.long, device=device)  # (1, T)
            logits = decoder.last_logits(full, None)



class PromptSampler:
    """The sample a trainer shows at each evaluation: the greedy continuation of one fixed prompt, so the
    samples of successive evaluations compare. `sampler(model) -> (prompt text, continuation text)`."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 48, stop_ids: Sequence[int] = ()):
        self.tok, self.prompt_ids = tokenizer, list(prompt_ids)
        self.max_new_tokens, self.stop_ids = max_new_tokens, tuple(stop_ids)

    def __call__(self, model: GPT) -> tuple[str, str]:
        out = generate(model, self.prompt_ids, self.max_new_tokens, stop_ids=self.stop_ids)
        return self.tok.decode(self.prompt_ids), self.tok.decode([t for t in out if t not in self.stop_ids])
