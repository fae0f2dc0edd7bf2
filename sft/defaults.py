"""The offline default datasets (what each is: sft/README.md "Offline default datasets"), written once, atomically,
as ordinary datasets: a default run is the same as `--data DIR/train.jsonl --val-data DIR/val.jsonl`.
SFT and DPO come from the interpreter's standard library functions (validation examples and held-out pairs
from functions no training example uses), plus GRPO's arithmetic conversations in the SFT training file;
GRPO's prompts from sft/rewards.py.
"""
from __future__ import annotations

import ast
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from data.sources import default_corpus_files
from model.fileio import atomic_write
from sft.common import METHODS
from sft.rewards import arithmetic_conversations, arithmetic_problems

log = logging.getLogger("furnace")

DEFAULT_SFT_DIR, DEFAULT_DPO_DIR = Path(METHODS["sft"].data_dir), Path(METHODS["dpo"].data_dir)  # relative to the cwd
MAX_SOURCE_CHARS = 1200     # longer functions are left out (the tiny CPU model has a 512-token context)
SFT_TRAIN, SFT_VAL = 500, 64
ARITH_SFT, ARITH_SEED = 400, 4321     # arithmetic conversations in the SFT training file (GRPO's prompts use 1234)
DPO_TRAIN, DPO_VAL = 192, 64
SEED = 1234


@dataclass
class Func:
    name: str
    signature: str
    summary: str
    source: str
    where: str

    @property
    def instruction(self) -> str:
        return f"Write a Python function `{self.signature}` that {self.summary[0].lower()}{self.summary[1:]}"


def functions_in(text: str, where: str) -> list[Func]:
    """Public, undecorated top-level functions with a docstring whose first line has some words."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # a few stdlib files are templates or target other versions
        return []
    out = []
    for node in tree.body:
        if (not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.decorator_list
                or node.name.startswith("_") or not ast.get_docstring(node)):
            continue
        summary = ast.get_docstring(node).strip().splitlines()[0].strip()
        src = ast.get_source_segment(text, node)
        if len(summary.split()) >= 3 and src and len(src) <= MAX_SOURCE_CHARS:
            out.append(Func(node.name, f"{node.name}({ast.unparse(node.args)})", summary, src, where))
    return out


def stdlib_functions() -> list[Func]:
    """Every candidate function of the standard library, deduplicated by source, in file order."""
    funcs, seen = [], set()
    for f in default_corpus_files():
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for fn in functions_in(text, f.name):
            if fn.source not in seen:
                seen.add(fn.source)
                funcs.append(fn)
    return funcs


def corrupted(fn: Func) -> str | None:
    """The function with its body lines (after the def line and docstring) in reverse order, or None when the
    body has fewer than two distinct lines."""
    lines = fn.source.splitlines()
    tree = ast.parse(fn.source).body[0]
    start = tree.body[1].lineno - 1 if len(tree.body) > 1 else len(lines)
    return "\n".join(lines[:start] + lines[start:][::-1]) if len(set(lines[start:])) >= 2 else None


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def build_default_data(kind: str) -> None:
    """The default data of method `kind` (GRPO's is rewritten each time: it is small and seeded)."""
    if kind != "grpo":
        return build_default_datasets()
    for name, recs in zip(("train", "val"), arithmetic_problems()):
        _write_jsonl(Path(METHODS["grpo"].data_dir) / f"{name}.jsonl", recs)


def build_default_datasets(sft_dir: Path = DEFAULT_SFT_DIR, dpo_dir: Path = DEFAULT_DPO_DIR) -> None:
    """Write {sft_dir,dpo_dir}/{train,val}.jsonl (skipped when all four exist)."""
    files = [sft_dir / "train.jsonl", sft_dir / "val.jsonl", dpo_dir / "train.jsonl", dpo_dir / "val.jsonl"]
    if all(f.is_file() for f in files):
        return
    funcs = stdlib_functions()
    random.Random(SEED).shuffle(funcs)
    n_val = min(SFT_VAL + DPO_VAL, len(funcs) // 4)
    val, train = funcs[:n_val], funcs[n_val:n_val + SFT_TRAIN]
    sft_val, dpo_val_funcs = val[:n_val // 2], val[n_val // 2:]
    arith = [{"conversations": c} for c in arithmetic_conversations(ARITH_SFT, ARITH_SEED)]
    conv = [[{"conversations": [{"role": "user", "content": fn.instruction},
                                {"role": "assistant", "content": fn.source}]} for fn in fns]
            for fns in (train, sft_val)]
    _write_jsonl(files[0], conv[0] + arith)
    _write_jsonl(files[1], conv[1])
    _write_jsonl(files[2], _pairs(train[:DPO_TRAIN], train))
    _write_jsonl(files[3], _pairs(dpo_val_funcs, dpo_val_funcs))
    log.info(f"default datasets: {len(funcs)} stdlib functions qualify -> SFT {len(train)} (+ {len(arith)} arithmetic) "
             f"train / {len(sft_val)} val in {sft_dir}, DPO {min(DPO_TRAIN, len(train))} train / {len(dpo_val_funcs)} held-out pairs in {dpo_dir}")


def _pairs(funcs: list[Func], pool: list[Func]) -> list[dict]:
    """TRL-style {"prompt", "chosen", "rejected"} records (even: mismatched function, odd: corrupted body)."""
    rng = random.Random(SEED + 1)
    out = []
    for i, fn in enumerate(funcs):
        bad = corrupted(fn) if i % 2 else None
        while bad is None:
            other = pool[rng.randrange(len(pool))]
            bad = other.source if other.name != fn.name else None
        out.append({"prompt": fn.instruction, "chosen": fn.source, "rejected": bad})
    return out
