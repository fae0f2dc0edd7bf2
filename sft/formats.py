"""Dataset readers: records -> chat messages, with errors that name FILE:LINE. The record formats of SFT
(MiniMind / ShareGPT, OpenAI, Alpaca), DPO (MiniMind, TRL) and GRPO ({"prompt", "answer"}) and `--data`'s
files, folders and `hf:NAME[:SPLIT]`: sft/README.md. A bad record raises FurnaceError("FILE:LINE: what is
wrong") unless skip_bad is set: then it is skipped, counted, and the count is logged (never silently).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data.chat_template import ROLES
from kernels.common import FurnaceError

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # other "from" values are taken as the role


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
    for part in filter(None, (p.strip() for p in arg.split(","))):
        p = Path(part).expanduser()
        if part.startswith("hf:"):
            out.append(part)
        elif p.is_dir():
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
    path = Path(source)
    if source.startswith("hf:"):
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
        yield from ((f"{source}[{i}]", row) for i, row in enumerate(ds))
    elif path.suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FurnaceError(f"{path}: not valid JSON ({e}); expected a list of records (or use .jsonl)") from None
        if not isinstance(items, list):
            raise FurnaceError(f"{path}: expected a JSON list of records (or one record per line in a .jsonl file)")
        yield from ((f"{path}[{i}]", item) for i, item in enumerate(items))
    else:
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
    if not isinstance(rec, dict):
        raise FurnaceError(f"expected a JSON object, got {type(rec).__name__}")
    key = next((k for k in ("conversations", "messages") if k in rec), None)
    if key:
        return check_turns(_messages(rec[key], key))
    if "instruction" not in rec and "output" not in rec:
        raise FurnaceError(f"unknown record format with keys {sorted(rec)[:6]}; expected 'conversations', "
                           f"'messages' or Alpaca 'instruction'/'input'/'output'")
    for k in ("instruction", "output"):
        if not isinstance(rec.get(k), str):
            raise FurnaceError(f"Alpaca record: '{k}' is {'missing' if k not in rec else 'not a string'}")
    user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
    return check_turns(msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}])


def _prompt(value, key: str, role: str = "user") -> list[dict]:
    """A string (one `role` message) or a message list."""
    return [{"role": role, "content": value}] if isinstance(value, str) else _messages(value, key)


def dpo_messages(rec) -> tuple[list[dict], list[dict]]:
    """One DPO record -> (chosen messages, rejected messages), each ending with the assistant's reply."""
    if not isinstance(rec, dict):
        raise FurnaceError(f"expected a JSON object, got {type(rec).__name__}")
    for k in ("chosen", "rejected"):
        if k not in rec:
            raise FurnaceError(f"preference record has no '{k}' (expected {{'chosen', 'rejected'}} message lists "
                               f"or TRL {{'prompt', 'chosen', 'rejected'}})")
    prompt = _prompt(rec["prompt"], "prompt") if "prompt" in rec else []
    pair = tuple(prompt + (_prompt(rec[k], k, "assistant") if prompt else _messages(rec[k], k))
                 for k in ("chosen", "rejected"))
    for k, msgs in zip(("chosen", "rejected"), pair):
        if msgs[-1]["role"] != "assistant":
            raise FurnaceError(f"'{k}' ends with a {msgs[-1]['role']!r} message; it must end with the assistant's reply")
        check_turns(msgs, f"'{k}'")
    if pair[0] == pair[1]:
        raise FurnaceError("'chosen' and 'rejected' are identical: the pair prefers nothing")
    return pair


def grpo_record(rec) -> tuple[list[dict], str, str]:
    """{"prompt": str | [messages], "answer": ...} or {"messages": [...], "answer": ...} -> (messages for the
    generation prompt, the last user message's text, the answer as a string)."""
    if not isinstance(rec, dict):
        raise FurnaceError(f"expected an object with 'prompt' (or 'messages') and 'answer', got {type(rec).__name__}")
    if "answer" not in rec:
        raise FurnaceError("no 'answer' (the exact answer the reward checks)")
    ans = rec["answer"]
    if isinstance(ans, bool) or not isinstance(ans, (str, int, float)):
        raise FurnaceError(f"'answer' is a {type(ans).__name__}; expected a string or a number")
    key = next((k for k in ("prompt", "messages") if k in rec), None)
    if key is None:
        raise FurnaceError("no 'prompt' or 'messages'")
    msgs = _prompt(rec[key], key)
    if msgs[-1]["role"] != "user":
        raise FurnaceError(f"the prompt ends with a '{msgs[-1]['role']}' message; it must end with the user's turn")
    return msgs, msgs[-1]["content"], str(ans)
