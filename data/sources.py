"""Document sources for `prepare`: local files and folders, JSONL, Parquet, Hugging Face datasets,
and the embedded default corpus (the running interpreter's standard library sources).

Every reader yields one `str` per document and streams: no reader holds more than one file
(or one Parquet record batch) in memory. Problems that lose data are counted in `SourceStats`
and reported by `prepare`; problems that make the input unusable raise `FurnaceError`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from kernels.common import FurnaceError

log = logging.getLogger("furnace")

TEXT_SUFFIXES = {".txt", ".md", ".py"}
ALL_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass
class SourceStats:
    documents: int = 0
    empty: int = 0            # documents with no text: skipped
    replaced: int = 0         # files / lines that were not valid UTF-8: decoded with U+FFFD replacements
    unreadable: int = 0       # files that could not be read: skipped
    examples: list[str] = field(default_factory=list)  # a few of the affected files, for the report

    def note(self, what: str, where: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        if len(self.examples) < 5:
            self.examples.append(f"{where} ({what})")

    def as_dict(self) -> dict:
        return {"documents": self.documents, "empty_skipped": self.empty, "non_utf8_replaced": self.replaced,
                "unreadable_skipped": self.unreadable, "examples": self.examples}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def default_corpus_files(max_files: int | None = None) -> list[Path]:
    """The running interpreter's standard library .py files, sorted; no site-packages, no tests."""
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test_")
                             and not d.startswith("python3") and not d.startswith("config-"))
        files.extend(Path(dirpath) / f for f in sorted(filenames)
                     if f.endswith(".py") and not f.startswith("test_"))
    files.sort()
    if not files:
        raise FurnaceError(f"default corpus: no .py files under {root} (this interpreter ships without its "
                           f"standard library sources); pass --source with your own files")
    return files[:max_files] if max_files else files


def expand_source(src: str | os.PathLike) -> list[Path]:
    """A file, or a folder searched recursively for .txt/.md/.py/.jsonl/.parquet files (sorted)."""
    p = Path(src).expanduser()
    if not p.exists():
        raise FurnaceError(f"--source {src}: no such file or directory")
    if p.is_file():
        if p.suffix.lower() not in ALL_SUFFIXES:
            raise FurnaceError(f"--source {src}: unsupported file type {p.suffix or '(none)'!r}; expected one of "
                               f"{', '.join(sorted(ALL_SUFFIXES))}")
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in ALL_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise FurnaceError(f"--source {src}: folder holds no {', '.join(sorted(ALL_SUFFIXES))} files")
    return files


def _decode(raw: bytes, where: str, stats: SourceStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.note("replaced", where)
        return raw.decode("utf-8", errors="replace")


def iter_text_file(path: Path, stats: SourceStats) -> Iterator[str]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        stats.note("unreadable", f"{path}: {e.strerror or e}")
        return
    yield _decode(raw, str(path), stats)


def iter_jsonl(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    try:
        f = open(path, "rb")
    except OSError as e:
        stats.note("unreadable", f"{path}: {e.strerror or e}")
        return
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = _decode(raw, f"{path}:{lineno}", stats)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FurnaceError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                   f"expected one JSON object per line") from None
            if not isinstance(row, dict) or text_field not in row:
                keys = sorted(row)[:8] if isinstance(row, dict) else type(row).__name__
                raise FurnaceError(f"{path}:{lineno}: no {text_field!r} field (found {keys}); "
                                   f"pick the text field with --text-field")
            text = row[text_field]
            if not isinstance(text, str):
                raise FurnaceError(f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, expected a string")
            yield text


def iter_parquet(path: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FurnaceError(f"--source {path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except OSError as e:
        stats.note("unreadable", f"{path}: {e}")
        return
    names = pf.schema_arrow.names
    if text_field not in names:
        raise FurnaceError(f"{path}: no column {text_field!r} (columns: {names[:8]}); pick it with --text-field")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise FurnaceError(f"{path}: column {text_field!r} holds {type(text).__name__} values, expected strings")
            yield text or ""


def iter_files(files: list[Path], text_field: str, stats: SourceStats) -> Iterator[str]:
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            yield from iter_jsonl(f, text_field, stats)
        elif suffix == ".parquet":
            yield from iter_parquet(f, text_field, stats)
        else:
            yield from iter_text_file(f, stats)


def iter_hf(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    """Stream a Hugging Face dataset (needs the `datasets` library and network)."""
    try:
        import datasets
    except ImportError:
        raise FurnaceError(f"--hf {name}: needs the `datasets` library (pip install datasets), or pass local "
                           f"files with --source") from None
    hint = (f"--hf {name}: could not stream the dataset from the Hugging Face hub; this needs network access. "
            f"Offline, download the data elsewhere and pass the files (.jsonl/.parquet/.txt) with --source")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        it = iter(ds)
        first = next(it, None)
    except Exception as e:  # hub/network/cache errors come in many types; all mean "cannot stream this"
        raise FurnaceError(f"{hint} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if first is None:
        return
    if text_field not in first:
        raise FurnaceError(f"--hf {name}: rows have no {text_field!r} field (fields: {sorted(first)[:8]}); "
                           f"pick it with --text-field")
    yield first[text_field]
    for row in it:
        yield row[text_field]


def describe_sources(sources, hf: str | None, hf_config: str | None, hf_split: str, max_files=None) -> list[dict]:
    """The manifest's record of where the documents came from."""
    if hf:
        return [{"kind": "hf", "name": hf, "config": hf_config, "split": hf_split}]
    if not sources:
        return [{"kind": "stdlib", "path": str(stdlib_root()), "python": sys.version.split()[0],
                 "files": len(default_corpus_files(max_files))}]
    return [{"kind": "path", "path": str(Path(s).resolve())} for s in sources]


def iter_documents(sources, text_field: str, hf: str | None, hf_config: str | None, hf_split: str,
                   stats: SourceStats, max_files: int | None = None) -> Iterator[str]:
    """All documents of all sources in a fixed order; empty documents are counted and skipped."""
    if hf:
        it = iter_hf(hf, hf_config, hf_split, text_field)
    elif sources:
        files = [f for s in sources for f in expand_source(s)]
        it = iter_files(files[:max_files] if max_files else files, text_field, stats)
    else:
        it = iter_files(default_corpus_files(max_files), text_field, stats)
    for text in it:
        if not text:
            stats.empty += 1
            continue
        stats.documents += 1
        yield text
