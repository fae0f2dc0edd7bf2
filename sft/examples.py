"""One conversation -> (input_ids, labels) for supervised fine-tuning, through the one chat template.

Labels are aligned with input_ids (Hugging Face convention): labels[i] == input_ids[i] where the token is
trained, -100 elsewhere. The model's targets are labels shifted left by one (sft/packing.py does that per
example, so no target ever reaches into the next packed example).

Trained tokens (the template's trainable segments, data/chat_template.py): every assistant reply, with its
optional `<think>` block and its `<|im_end|>` (the stop token at inference). Never trained: system and user
turns, the `<|im_start|>assistant\n` headers, the "\n" after `<|im_end|>`. DPO completions (`last_only=True`)
train only the final assistant reply.

Truncation policy (`truncate`):
  - False (the CLI default): an example longer than `max_len` raises ExampleTooLong, which the readers turn
    into `FILE:LINE: ...` or, with --skip-bad, a skipped-and-counted record.
  - True (--truncate): drop the oldest exchanges first (the system message stays; an exchange is a user
    message with the replies after it, dropped whole) while more than one assistant reply remains; if the
    rest is still too long, cut it on the right at `max_len` (the last reply then loses its end and its
    `<|im_end|>` label). An example left with no trained token raises.
"""
from __future__ import annotations

from data.chat_template import encode_chat_segments, require_chat_tokens
from kernels.common import FurnaceError
from train.task import IGNORE  # noqa: F401  (also imported from here)


class ExampleTooLong(FurnaceError):
    """The conversation does not fit the context (see the truncation policy above)."""


def _exchanges(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(leading system messages, blocks each starting at a user message with the replies after it)."""
    head = []
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        head.append(messages[i])
        i += 1
    blocks: list[list[dict]] = []
    for m in messages[i:]:
        if m["role"] == "user" or not blocks:
            blocks.append([m])
        else:
            blocks[-1].append(m)
    return head, blocks


def _encode(tokenizer, messages, last_only: bool) -> tuple[list[int], list[int]]:
    segs = encode_chat_segments(tokenizer, messages)
    trainable = [k for k, (_, t) in enumerate(segs) if t]
    keep = set(trainable[-1:]) if last_only else set(trainable)
    ids, labels = [], []
    for k, (seg, _) in enumerate(segs):
        ids.extend(seg)
        labels.extend(seg if k in keep else [IGNORE] * len(seg))
    return ids, labels


def build_sft_example(tokenizer, messages: list[dict], max_len: int, truncate: bool = False,
                      last_only: bool = False) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels), both of length <= max_len. See the module docstring for what is trained and
    for the truncation policy. Raises FurnaceError for a conversation without an assistant reply (or, with
    last_only, not ending in one) and ExampleTooLong for one that does not fit."""
    require_chat_tokens(tokenizer)
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages] if isinstance(messages, list) else []
    if "assistant" not in roles:
        encode_chat_segments(tokenizer, messages)  # malformed messages get the template's own error first
        raise FurnaceError("conversation has no assistant turn: nothing to train on (each example needs at "
                           "least one {'role': 'assistant', 'content': ...} message)")
    if last_only and roles[-1] != "assistant":
        raise FurnaceError(f"conversation ends with a {roles[-1]!r} message; a preference completion must end "
                           f"with the assistant's reply")
    ids, labels = _encode(tokenizer, messages, last_only)
    if len(ids) <= max_len:
        return ids, labels
    if not truncate:
        raise ExampleTooLong(f"example is {len(ids)} tokens, longer than the context of {max_len} (--seq-len); "
                             f"raise --seq-len, pass --truncate to cut it (oldest turns first), or --skip-bad")
    head, blocks = _exchanges(list(messages))
    while len(ids) > max_len and sum(m["role"] == "assistant" for b in blocks[1:] for m in b) >= 1:
        blocks = blocks[1:]
        ids, labels = _encode(tokenizer, head + [m for b in blocks for m in b], last_only)
    ids, labels = ids[:max_len], labels[:max_len]
    if all(t == IGNORE for t in labels):
        raise ExampleTooLong(f"example keeps no assistant token within the context of {max_len} even after "
                             f"truncation (its prompt alone is too long); raise --seq-len or drop it (--skip-bad)")
    return ids, labels
