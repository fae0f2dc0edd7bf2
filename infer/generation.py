"""Autoregressive generation with a preallocated KV cache.

Prefill runs the whole prompt once; each decode step feeds one token and reads the cache. Without the
cache every step recomputes the whole sequence (the reference the tests compare against).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from infer.decode import Decoder, eager_last_logits
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



@torch.inference_mode()
def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, stop_ids: Sequence[int] = (),
                   seeds: Sequence[int] | None = None) -> list[list[int]]:
    """`generate` for many prompts at once (GRPO's rollouts): one KV cache with a row per prompt. Each distinct
    prompt is prefilled alone in its row (a run of equal prompts, e.g. GRPO's G copies, once: its keys and
    values are copied to the other rows), then one decode step per new token for all rows together, each row
    at its own position (`GPT.hidden_states(..., row_pos=)`, the server's continuous-batching path: no
    padding). Row i samples with its own generator seeded `seeds[i]`, so it produces the tokens
    `generate(model, prompts[i], ..., seed=seeds[i])` produces (tested). Returns each row's new tokens, up to
    and including the stop token that ended it; rows that are done are fed their stop token (ignored) until
    every row is done or `max_new_tokens` is reached."""
    params = SamplingParams(temperature, top_k, top_p)
    B, T_max = len(prompts), context_len(model)
    prompts = [list(p) for p in prompts]
    if not B or min(len(p) for p in prompts) == 0:
        raise ValueError("generate_batch: every prompt needs at least one token")
    L = max(len(p) for p in prompts)
    if L >= T_max:
        raise ValueError(f"generate_batch: a prompt of {L} tokens leaves no room in the context ({T_max})")
    max_new_tokens = min(max_new_tokens, T_max - L)
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds] if seeds is not None else None
    device = model.embed.weight.device
    stops = frozenset(int(s) for s in stop_ids)
    cache = model.new_cache(B, L + max_new_tokens)
    logits = []
    for i, p in enumerate(prompts):
        if i and p == prompts[i - 1]:                                      # same prompt: copy the row
            cache.copy_row(i - 1, i, len(p))
            logits.append(logits[-1])
        else:
            x = torch.tensor([p], dtype=torch.long, device=device)          # (1, T)
            logits.append(eager_last_logits(model, x, cache.rows(i, i + 1)).float().cpu())   # (V,)
    logits = torch.stack(logits)                                           # (B, V)
    pos = torch.tensor([len(p) for p in prompts], dtype=torch.long)        # (B,) next position of each row
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        for i in range(B):
            if not done[i]:
                tok = next_token(logits[i], params, None, gens[i] if gens else None)
                out[i].append(tok)
                done[i] = tok in stops
        if all(done) or step == max_new_tokens - 1:
            break
        x = torch.tensor([[o[-1]] for o in out], dtype=torch.long, device=device)     # (B, 1)
        h = model.hidden_states(x, cache, row_pos=pos)                                # (B, 1, d)
        logits = model.lm_head(h[:, -1]).float().cpu()                                # (B, V)
        pos += 1
    return out


class PromptSampler:
    """The sample a trainer shows at each evaluation: the greedy continuation of one fixed prompt, so the
    samples of successive evaluations compare. `sampler(model) -> (prompt text, continuation text)`."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 48, stop_ids: Sequence[int] = ()):
        self.tok, self.prompt_ids = tokenizer, list(prompt_ids)
        self.max_new_tokens, self.stop_ids = max_new_tokens, tuple(stop_ids)

    def __call__(self, model: GPT) -> tuple[str, str]:
        out = generate(model, self.prompt_ids, self.max_new_tokens, stop_ids=self.stop_ids)
        return self.tok.decode(self.prompt_ids), self.tok.decode([t for t in out if t not in self.stop_ids])
