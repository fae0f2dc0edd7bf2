"""Streaming chat and completion sessions: the logic behind infer/chat.py, testable without a terminal.

A `ChatSession` keeps the conversation as messages and renders it with the one chat template
(data/chat_template.py) for every turn. The KV cache is kept across turns: the new prompt's longest common
prefix with what the cache already holds is not recomputed. History that no longer fits the context
(minus room for the answer) loses its oldest user/assistant turns, then, if a single message is still too
long, the prompt is cut from the left; each with a notice.
"""
from __future__ import annotations

from typing import Callable

from data.chat_template import encode_chat, require_chat_tokens, stop_ids
from infer.generation import generate
from infer.sampling import SamplingParams
from model.gpt import GPT

Writer = Callable[[str], None]


class StreamDecoder:
    """Token ids -> text pieces as soon as they form complete characters (byte-level BPE can split a
    UTF-8 character across tokens; an incomplete tail decodes to U+FFFD and is held back)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.printed = text[self.printed:], len(text)
        if text.endswith("\n"):  # start a fresh window: decoding stays O(line), not O(answer)
            self.ids, self.printed = [], 0
        return piece

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        piece = text[self.printed:]
        self.ids, self.printed = [], 0
        return piece


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Base:
    def __init__(self, model: GPT, tokenizer, sampling: SamplingParams | None = None, max_new_tokens: int = 256,
                 seed: int | None = None, write: Writer = print, notice: Writer = print, decoder=None):
        self.model, self.tok, self.decoder = model, tokenizer, decoder  # decoder: infer.decode.Decoder or None
        self.sampling = sampling or SamplingParams()
        self.max_new_tokens = max_new_tokens
        self.seed, self.turn = seed, 0
        self.write, self.notice = write, notice
        self.T = model.config.max_seq_len
        self.cache = model.new_cache(1, self.T)
        self.cached_ids: list[int] = []  # tokens whose keys/values fill cache[:len(cached_ids)]

    def prompt_budget(self) -> int:
        """Prompt tokens allowed so that the answer still has room (at most half the context is reserved)."""
        return self.T - min(self.max_new_tokens, self.T // 2)

    def _truncate(self, ids: list[int], budget: int) -> list[int]:
        if len(ids) > budget:
            self.notice(f"[prompt of {len(ids)} tokens is longer than the {budget} the context leaves for it "
                        f"({self.T} - room for the answer): kept the last {budget} tokens]")
            ids = ids[-budget:]
        return ids

    def _run(self, prompt: list[int], stops) -> tuple[list[int], bool]:
        """Generate and stream. Returns (new tokens without the stop token, interrupted?)."""
        dec = StreamDecoder(self.tok)
        new: list[int] = []

        def on_token(t: int) -> None:
            new.append(t)
            if t not in stops:
                piece = dec.push(t)
                if piece:
                    self.write(piece)

        self.cache.pos = common_prefix(self.cached_ids, prompt)
        seed = None if self.seed is None else self.seed + self.turn
        self.turn += 1
        s = self.sampling
        try:
            out = generate(self.model, prompt, self.max_new_tokens, s.temperature, s.top_k, s.top_p,
                           s.repetition_penalty, stop_ids=stops, seed=seed, on_token=on_token, cache=self.cache,
                           decoder=self.decoder)
        except KeyboardInterrupt:
            self.write(dec.flush())
            self.cached_ids, self.cache.pos = [], 0   # the cache may hold a half-written step
            return [t for t in new if t not in stops], True
        self.write(dec.flush())
        self.cached_ids = prompt + out[:-1]           # the last token chosen is never fed
        if len(prompt) + len(out) >= self.T and (not out or out[-1] not in stops):
            self.notice(f"[context of {self.T} tokens full: answer cut]")
        return [t for t in out if t not in stops], False


class ChatSession(_Base):
    """Multi-turn chat. `respond(text)` streams the answer through `write` and returns it."""

    def __init__(self, model: GPT, tokenizer, system: str | None = None, **kw):
        super().__init__(model, tokenizer, **kw)
        require_chat_tokens(tokenizer)
        self.system = system
        self.stops = stop_ids(tokenizer)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def build_prompt(self) -> list[int]:
        """Encode the history with the generation prompt, dropping the oldest turns until it fits."""
        budget = self.prompt_budget()
        while True:
            ids = encode_chat(self.tok, self.messages, add_generation_prompt=True)
            if len(ids) <= budget:
                return ids
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            # The newest user message always stays; drop the oldest user message and the replies after it.
            if len(self.messages) - first <= 1:
                return self._truncate(ids, budget)
            end = first + 1
            while end < len(self.messages) - 1 and self.messages[end]["role"] == "assistant":
                end += 1
            del self.messages[first:end]
            self.notice("[context full: dropped the oldest turn of the conversation]")

    def respond(self, text: str) -> tuple[str, bool]:
        """Add a user message, stream the answer. Returns (answer text, interrupted?)."""
        self.messages.append({"role": "user", "content": text})
        new, interrupted = self._run(self.build_prompt(), self.stops)
        answer = self.tok.decode(new)
        self.messages.append({"role": "assistant", "content": answer})
        return answer, interrupted


class CompletionSession(_Base):
    """Plain continuation for pretrain-only checkpoints: no template, stops at end-of-text."""

    def complete(self, text: str) -> tuple[str, bool]:
        ids = self.tok.encode(text)
        if not ids:
            ids = [self.tok.eos_id]
        ids = self._truncate(ids, self.prompt_budget())
        new, interrupted = self._run(ids, (self.tok.eos_id,))
        return self.tok.decode(new), interrupted
