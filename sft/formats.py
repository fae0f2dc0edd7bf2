"""Dataset readers for SFT and DPO: records -> chat messages, with errors that name FILE:LINE.

SFT records (one JSON object per line of a .jsonl file, or the items of a .json list):
    {"conversations": [{"role": "user", "content": ...}, ...]}     MiniMind (also ShareGPT "from"/"value")
    {"messages": [{"role": ..., "content": ...}, ...]}             OpenAI / Hugging Face
    {"instruction": ..., "input": ..., "output": ...}              Alpaca ("input" and "system" optional)
DPO records:
    {"chosen": [messages], "rejected": [messages]}                 MiniMind
    {"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages]}   TRL
An assistant message may carry its reasoning as "reasoning" (or "reasoning_content"); the template renders
it as a <think> block.

`--data` takes files, folders (their *.jsonl / *.json files) or `hf:NAME[:SPLIT]` (a Hugging Face dataset,
online only), comma-separated, mixed freely. A bad record raises FurnaceError("FILE:LINE: what is wrong")
unless skip_bad is set: then it is skipped, counted, and the count is logged (never silently).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data.chat_template import ROLES
from kernels.common import FurnaceError

log = logging.getLogger("furnace")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


@dataclass
class BadRecords:
    """Policy and tally for bad records: raise (default) or skip and count (--skip-bad)."""
    skip: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def report(self, where: str, msg: str) -> None:
        if not self.skip:
            raise FurnaceError(f"{where}: {msg} (fix or remove this record, or pass --skip-bad to skip bad records)")
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(f"{where}: {msg}")

    def summary(self, what: str) -> str:
        if not self.count:
            return f"{what}: no bad records"
        return f"{what}: skipped {self.count} bad record(s) (--skip-bad), e.g. " + " | ".join(self.examples)


def expand_data_arg(arg: str) -> list[str]:
    """'a.jsonl,dir,hf:name' -> files (folders expanded, sorted) and hf: names; FurnaceError for missing paths."""
    out: list[str] = []
    for part in (p.strip() for p in arg.split(",")):
        if not part:
            continue
        if part.startswith("hf:"):
            out.append(part)
            continue
        p = Path(part).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix in (".jsonl", ".json") and f.is_file())
            if not files:
                raise FurnaceError(f"--data {part}: folder holds no .jsonl or .json files")
            out.extend(str(f) for f in files)
        elif p.is_file():
            out.append(str(p))
        else:
            raise FurnaceError(f"--data {part}: no such file or folder (for a Hugging Face dataset write hf:NAME)")
    if not out:
        raise FurnaceError(f"--data {arg!r}: no files given")
    return out


def iter_records(source: str, bad: BadRecords) -> Iterator[tuple[str, object]]:
    """(where, parsed JSON value) per record of one source; `where` is FILE:LINE (or FILE[item], hf:NAME[row])."""
    if source.startswith("hf:"):
        yield from _iter_hf(source)
        return
    path = Path(source)
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FurnaceError(f"{path}: not valid JSON ({e}); expected a list of records (or use .jsonl)") from None
        if not isinstance(items, list):
            raise FurnaceError(f"{path}: expected a JSON list of records (or one record per line in a .jsonl file)")
        for i, item in enumerate(items):
            yield f"{path}[{i}]", item
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(raw.rstrip(b"\r\n"))
            except json.JSONDecodeError as e:  # its own "line 1 column N" is this line's: say only the column
                bad.report(f"{path}:{n}", f"malformed JSON at column {e.colno}: {e.msg}")
            except UnicodeDecodeError as e:
                bad.report(f"{path}:{n}", f"not UTF-8 (byte {e.start + 1} of the line)")


def _iter_hf(source: str) -> Iterator[tuple[str, object]]:
    name, _, split = source[3:].partition(":")
    try:
        import datasets
    except ImportError:
        raise FurnaceError(f"--data {source}: reading Hugging Face datasets needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as e:  # network, missing dataset, auth: the library raises many types
        raise FurnaceError(f"--data {source}: could not open the Hugging Face dataset ({type(e).__name__}: "
                           f"{str(e)[:160]}); it needs network, or pass local .jsonl files") from None
    for i, row in enumerate(ds):
        yield f"{source}[{i}]", row


# ---- record -> messages ----------------------------------------------------------------------------
def _messages(value, where_key: str) -> list[dict]:
    """A list of role/content (or ShareGPT from/value) dicts -> template messages (checked by the template)."""
    if not isinstance(value, list) or not value:
        raise FurnaceError(f"'{where_key}' must be a non-empty list of {{'role', 'content'}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise FurnaceError(f"'{where_key}'[{i}] is a {type(m).__name__}, expected an object with role and content")
        if "role" not in m and "from" in m:
            if "value" not in m:
                raise FurnaceError(f"'{where_key}'[{i}] has no 'value' (the ShareGPT message text) - it is missing")
            m = {"role": _SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]}
        if "role" not in m:
            raise FurnaceError(f"'{where_key}'[{i}] has no 'role' (expected system, user or assistant)")
        if m["role"] not in ROLES:
            raise FurnaceError(f"'{where_key}'[{i}]: role {m['role']!r} is not one of {', '.join(ROLES)}")
        if "content" not in m:
            raise FurnaceError(f"'{where_key}'[{i}] ({m['role']}) has no 'content' - it is missing")
        msg = {"role": m["role"], "content": m["content"]}
        reasoning = m.get("reasoning", m.get("reasoning_content"))
        if reasoning:
            msg["reasoning"] = reasoning
        out.append(msg)
    return out


def check_turns(msgs: list[dict], what: str = "conversation") -> list[dict]:
    """Bad conversations: one that opens with the assistant (after any system message), an assistant turn with
    no text (nothing to learn, or a broken export). Returns `msgs`."""
    first = next((m for m in msgs if m["role"] != "system"), None)
    if first is None:
        raise FurnaceError(f"{what} holds only system messages; expected a user turn and an assistant reply")
    if first["role"] == "assistant":
        raise FurnaceError(f"{what} opens with the assistant; expected a user turn first")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and isinstance(m.get("content"), str) and not m["content"].strip() \
                and not m.get("reasoning"):
            raise FurnaceError(f"{what}: assistant turn {i} is empty")
    return msgs


def sft_messages(rec) -> list[dict]:
    """One SFT record (any supported format) -> messages. FurnaceError (without location) when malformed."""
    return check_turns(_sft_messages(rec))


def _sft_messages(rec) -> list[dict]:
    if not isinstance(rec, dict):
        raise FurnaceError(f"expected a JSON object, got {type(rec).__name__}")
    if "conversations" in rec:
        return _messages(rec["conversations"], "conversations")
    if "messages" in rec:
        return _messages(rec["messages"], "messages")
    if "instruction" in rec or "output" in rec:
        for k in ("instruction", "output"):
            if not isinstance(rec.get(k), str):
                raise FurnaceError(f"Alpaca record: '{k}' is {'missing' if k not in rec else 'not a string'}")
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
        return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
    raise FurnaceError(f"unknown record format with keys {sorted(rec)[:6]}; expected 'conversations', 'messages' "
                       f"or Alpaca 'instruction'/'input'/'output'")


def _completion(value, key: str, prompt: list[dict]) -> list[dict]:
    if isinstance(value, str):
        return prompt + [{"role": "assistant", "content": value}]
    return prompt + _messages(value, key)


def dpo_messages(rec) -> tuple[list[dict], list[dict]]:
    """One DPO record -> (chosen messages, rejected messages), each ending with the assistant's reply."""
    if not isinstance(rec, dict):
        raise FurnaceError(f"expected a JSON object, got {type(rec).__name__}")
    for k in ("chosen", "rejected"):
        if k not in rec:
            raise FurnaceError(f"preference record has no '{k}' (expected {{'chosen', 'rejected'}} message lists "
                               f"or TRL {{'prompt', 'chosen', 'rejected'}})")
    if "prompt" in rec:
        p = rec["prompt"]
        if isinstance(p, str):
            prompt = [{"role": "user", "content": p}]
        else:
            prompt = _messages(p, "prompt")
        pair = _completion(rec["chosen"], "chosen", prompt), _completion(rec["rejected"], "rejected", prompt)
    else:
        pair = _messages(rec["chosen"], "chosen"), _messages(rec["rejected"], "rejected")
    for k, msgs in zip(("chosen", "rejected"), pair):
        if msgs[-1]["role"] != "assistant":
            raise FurnaceError(f"'{k}' ends with a {msgs[-1]['role']!r} message; it must end with the assistant's reply")
        check_turns(msgs, f"'{k}'")
    if pair[0] == pair[1]:
        raise FurnaceError("'chosen' and 'rejected' are identical: the pair prefers nothing")
    return pair
