"""Next-token selection: pure functions of the logits (no model), so they can be tested exhaustively.

Order of operations (as Hugging Face's logits processors): repetition penalty -> temperature ->
top-k -> top-p -> sample. temperature == 0 means greedy (argmax of the penalised logits).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.common import FurnaceError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_sampling(temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0) -> None:
    """FurnaceError naming the flag when a sampling value is out of range."""
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and temperature == temperature
            and temperature != float("inf")):
        raise FurnaceError(f"--temperature {temperature}: expected a finite number >= 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise FurnaceError(f"--top-k {top_k}: expected a positive integer (or leave it unset)")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise FurnaceError(f"--top-p {top_p}: expected a number in (0, 1]")
    if not (isinstance(repetition_penalty, (int, float)) and 0 < repetition_penalty < float("inf")):
        raise FurnaceError(f"--repetition-penalty {repetition_penalty}: expected a positive number (1.0 = off)")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already seen: positive logits / penalty, negative logits * penalty.
    logits: (V,) fp32; seen: (n,) int64 token ids (duplicates allowed). Returns a new tensor."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    out = logits.clone()
    vals = out[seen]                                                     # (n,)
    out[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return out


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability mass
    reaches top_p (the token that crosses top_p is kept; the most likely token is always kept).
    logits: (V,) fp32, already divided by the temperature."""
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)       # (V,)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs                # mass of strictly better tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> int:
    """Pick one token id from the last position's logits (V,)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
