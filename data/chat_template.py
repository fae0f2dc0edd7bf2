"""The one chat template (ChatML), used by SFT, DPO, CPU chat, HF export and evaluation.

    <|im_start|>system\n{content}<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n[<think>\n{reasoning}\n</think>\n]{content}<|im_end|>\n

`segments()` is the single source of truth: every other view (`render`, `encode_chat`, the Jinja
template written into an exported tokenizer_config.json) is derived from it or tested equal to it.
A segment is flagged *trainable* when it is an assistant's reply: its optional think block, its
content and its `<|im_end|>` (the stop token at inference). The "\n" after `<|im_end|>` and every
`<|im_start|>role\n` header are not trained.

Literal `<|im_start|>`, `<|im_end|>` and `<|endoftext|>` inside a message's text are **escaped**: tokenized
as plain characters, never as control tokens (only the markers the template writes are), so typed text
cannot end a turn or forge one. `<think>` / `</think>` written inline stay control tokens.

`encode_chat` tokenizes segment by segment, so trainable spans start and end on token boundaries and
the prompt rendered for inference (`add_generation_prompt=True`) is, token for token, the prefix of the
training sequence that continues it with the assistant's reply.
"""
from __future__ import annotations

import logging
import re

import torch

from kernels.common import FurnaceError

log = logging.getLogger("furnace")

ROLES = ("system", "user", "assistant")
IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CHAT_TOKENS = (EOS, IM_START, IM_END, THINK_OPEN, THINK_CLOSE)
STOP_TOKENS = (IM_END, EOS)
_THINK_SPLIT = re.compile(f"({re.escape(THINK_OPEN)}|{re.escape(THINK_CLOSE)})")

# The same template for Hugging Face tokenizers (tokenizer_config.json "chat_template");
# tests/test_chat_template.py checks that transformers' apply_chat_template renders exactly `render()`.
JINJA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' + message['role'] + '; expected system, user or assistant') -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' and message['reasoning'] is defined and message['reasoning'] -%}"
    "{{- '<think>\\n' + message['reasoning'] + '\\n</think>\\n' -}}"
    "{%- endif -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _check(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise FurnaceError(f"chat messages: expected a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise FurnaceError(f"chat message {i}: expected an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise FurnaceError(f"chat message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            what = "missing" if "content" not in m else f"a {type(m['content']).__name__}, not a string"
            raise FurnaceError(f"chat message {i} ({role}): 'content' is {what}; every message needs a text content")
        r = m.get("reasoning")
        if r is not None and not isinstance(r, str):
            raise FurnaceError(f"chat message {i}: 'reasoning' must be a string, got {type(r).__name__}")
        if r and role != "assistant":
            raise FurnaceError(f"chat message {i}: only assistant messages may carry 'reasoning' (this one is {role})")


def _parts(messages, add_generation_prompt: bool) -> list[tuple[list[tuple[str, bool]], bool]]:
    """Per segment: its pieces as (text, is the template's own <|im_start|>/<|im_end|> marker), and whether
    the segment is trained. Only markers the template writes become control tokens (see encode_chat_segments)."""
    _check(messages)
    out: list[tuple[list[tuple[str, bool]], bool]] = []
    for m in messages:
        role = m["role"]
        if role != "assistant":
            out.append(([(IM_START, True), (f"{role}\n{m['content']}", False), (IM_END, True), ("\n", False)], False))
            continue
        out.append(([(IM_START, True), ("assistant\n", False)], False))
        think = f"{THINK_OPEN}\n{m['reasoning']}\n{THINK_CLOSE}\n" if m.get("reasoning") else ""
        out.append(([(f"{think}{m['content']}", False), (IM_END, True)], True))
        out.append(([("\n", False)], False))
    if add_generation_prompt:
        out.append(([(IM_START, True), ("assistant\n", False)], False))
    return out


def segments(messages, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """Text pieces of the rendered conversation with a flag: True = trained (assistant reply + <|im_end|>).
    `"".join(text for text, _ in segments(m, g)) == render(m, g)`."""
    return [("".join(t for t, _ in parts), trainable) for parts, trainable in _parts(messages, add_generation_prompt)]


def render(messages, add_generation_prompt: bool = False) -> str:
    return "".join(text for text, _ in segments(messages, add_generation_prompt))


def _encode_text(tokenizer, text: str) -> list[int]:
    """Message text: <think> / </think> stay control tokens (reasoning written inline); <|im_start|>, <|im_end|>
    and <|endoftext|> typed by a user are escaped: tokenized as the plain characters they are."""
    ids: list[int] = []
    for piece in _THINK_SPLIT.split(text):
        if not piece:
            continue
        tid = tokenizer.token_id(piece) if piece in (THINK_OPEN, THINK_CLOSE) else None
        ids.extend([tid] if tid is not None else tokenizer.encode_ordinary(piece))
    return ids


def encode_chat_segments(tokenizer, messages, add_generation_prompt: bool = False) -> list[tuple[list[int], bool]]:
    """Token ids per segment (same flags as `segments`). Only the template's own markers become
    <|im_start|> / <|im_end|> ids: the same strings inside a message are escaped (plain text), so a user
    cannot close a turn or open an assistant turn by typing them."""
    out = []
    for parts, trainable in _parts(messages, add_generation_prompt):
        ids: list[int] = []
        for text, marker in parts:
            tid = tokenizer.token_id(text) if marker else None
            ids.extend([tid] if tid is not None else _encode_text(tokenizer, text))
        out.append((ids, trainable))
    return out


def encode_chat(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of the rendered conversation, tokenized segment by segment (see the module docstring)."""
    require_chat_tokens(tokenizer)
    return [i for ids, _ in encode_chat_segments(tokenizer, messages, add_generation_prompt) for i in ids]


def missing_chat_tokens(tokenizer) -> list[str]:
    return [t for t in CHAT_TOKENS if tokenizer.token_id(t) is None]


def require_chat_tokens(tokenizer) -> None:
    miss = missing_chat_tokens(tokenizer)
    if miss:
        raise FurnaceError(f"tokenizer {getattr(tokenizer, 'source', '')}: lacks the chat tokens {miss}; "
                           f"fine-tune with sft/ (which adds them) or use plain continuation (--complete)")


def stop_ids(tokenizer) -> tuple[int, ...]:
    """Ids of STOP_TOKENS present in the tokenizer."""
    return tuple(i for i in (tokenizer.token_id(t) for t in STOP_TOKENS) if i is not None)


@torch.no_grad()
def ensure_chat_tokens(tokenizer, model) -> bool:
    """Add missing chat special tokens to `tokenizer` and grow `model`'s embedding (and untied LM head) to
    the new vocabulary. New rows are the mean of the existing rows. Returns True when anything changed."""
    added = tokenizer.add_special_tokens([t for t in CHAT_TOKENS if tokenizer.token_id(t) is None])
    V_old, V_new = model.config.vocab_size, tokenizer.vocab_size
    grown = V_new > V_old
    if grown:
        _resize_vocab(model, V_new)
    if added or grown:
        log.info(f"chat template: added {added} special token(s) to the tokenizer"
                 + (f"; embeddings resized {V_old} -> {V_new} (new rows = mean embedding)" if grown else ""))
    return bool(added or grown)


def _resize_vocab(model, V: int) -> None:
    cfg = model.config
    old = model.embed.weight                                             # (V_old, d)
    emb = torch.nn.Embedding(V, cfg.n_embd, device=old.device, dtype=old.dtype)
    emb.weight[:old.shape[0]] = old
    emb.weight[old.shape[0]:] = old.mean(0)
    model.embed = emb
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    else:
        head = model.lm_head.weight                                      # (V_old, d)
        new = torch.nn.Linear(cfg.n_embd, V, bias=False, device=head.device, dtype=head.dtype)
        new.weight[:head.shape[0]] = head
        new.weight[head.shape[0]:] = head.mean(0)
        model.lm_head = new
    cfg.vocab_size = V
