"""One conversation -> (input_ids, labels) for supervised fine-tuning, through the one chat template.

Labels are aligned with input_ids (Hugging Face convention): labels[i] == input_ids[i] where the token is
trained, -100 elsewhere; sft/packing.py shifts them per example. Trained: every assistant reply, with its
`<think>` block and its `<|im_end|>` (DPO completions, `last_only=True`: the final reply only). Truncation
policy (an example longer than `max_len` raises ExampleTooLong unless `truncate`): sft/README.md.
"""
from __future__ import annotations

from data.chat_template import encode_chat_segments, require_chat_tokens
from kernels.common import FurnaceError
from train.task import IGNORE  # noqa: F401  (also imported from here)


class ExampleTooLong(FurnaceError):
    """The conversation does not fit the context (see the truncation policy above)."""


def _encode(tokenizer, messages, last_only: bool) -> tuple[list[int], list[int]]:
    segs = encode_chat_segments(tokenizer, messages)
    trainable = [k for k, (_, t) in enumerate(segs) if t]
    keep = set(trainable[-1:] if last_only else trainable)
    return ([t for seg, _ in segs for t in seg],
            [t if k in keep else IGNORE for k, (seg, _) in enumerate(segs) for t in seg])


def build_sft_example(tokenizer, messages: list[dict], max_len: int, truncate: bool = False,
                      last_only: bool = False) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels), both of length <= max_len. Raises FurnaceError for a conversation without an
    assistant reply (or, with last_only, not ending in one) and ExampleTooLong for one that does not fit."""
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
    # drop the oldest exchange (a user message with the replies after it; the system messages stay) while a
    # later one still holds an assistant reply
    head = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    for s in (i for i in range(head + 1, len(messages)) if messages[i]["role"] == "user"):
        if len(ids) <= max_len or "assistant" not in roles[s:]:
            break
        ids, labels = _encode(tokenizer, messages[:head] + messages[s:], last_only)
    ids, labels = ids[:max_len], labels[:max_len]
    if all(t == IGNORE for t in labels):
        raise ExampleTooLong(f"example keeps no assistant token within the context of {max_len} even after "
                             f"truncation (its prompt alone is too long); raise --seq-len or drop it (--skip-bad)")
    return ids, labels
