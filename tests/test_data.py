"""Tokenizer, shard format and `prepare` (library and CLI)."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data import SPECIAL_TOKENS, load_tokenizer, prepare, read_manifest, read_shard, train_bpe, write_shard
from data.shards import read_header
from data.sources import default_corpus_files, stdlib_root
from data.tokenizer import GPT2_PATTERN, tiktoken_to_tokenizer
from kernels.common import FurnaceError

ROOT = Path(__file__).resolve().parents[1]
PREPARE = str(ROOT / "data" / "prepare.py")

DOCS = [
    "def f(x):\n    return x * 2  # doubled\n",
    "Plain English prose, with punctuation; and   odd   spacing.\n\n\n",
    "unicode: héllo wörld — 日本語 テキスト 💥🔥 \u200b zero-width, tabs\t\tand \r\n CRLF",
    "a document that literally mentions <|endoftext|> and <|im_start|> inside its text",
    "x" * 3000,
    "\x00\x01 control bytes \x7f and a lone combining mark \u0301",
    "short",
] + [f"document number {i}: " + " ".join(f"word{j % 17}" for j in range(i * 7)) for i in range(30)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(iter(DOCS * 3), 400)


def write_docs(folder: Path, docs=DOCS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc_{i:03d}.txt").write_bytes(d.encode("utf-8"))
    return folder


def split_docs(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    """Cut a shard's tokens at EOS (each document is preceded by EOS)."""
    assert tokens[0] == eos
    cuts = np.flatnonzero(tokens == eos)
    return [tokens[a + 1:b] for a, b in zip(cuts, list(cuts[1:]) + [tokens.size])]


def llmc_write(path: Path, toks, magic=20240520, version=1, dtype=np.uint16):
    """An independent writer in the style of llm.c's dev/data/data_common.py."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(toks)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array(toks, dtype=dtype).tobytes())


def run_prepare(*args, env=None):
    return subprocess.run([sys.executable, PREPARE, "--no-progress", *map(str, args)], capture_output=True,
                          text=True, cwd="/", env={**os.environ, **(env or {})}, timeout=120)


def assert_cli_error(r, *needles):
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


# ---- tokenizer ---------------------------------------------------------------------------------
def test_tokenizer_round_trip_and_specials(tok, tmp_path):
    for text in DOCS + ["", " ", "\n\n", "ünïcödé never seen: ꙮ 𝔘𝔫𝔦 \U0010fffd"]:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode_ordinary(text)) == text
    assert tok.vocab_size == 400  # includes the specials
    assert list(tok.special_ids) == SPECIAL_TOKENS and tok.eos_id == tok.special_ids["<|endoftext|>"]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.token_id("<|im_start|>") and ids[-1] == tok.token_id("<|im_end|>")
    assert tok.eos_id not in tok.encode_ordinary("say <|endoftext|>")  # plain text in documents
    assert tok.token_id("no-such-token-here") is None
    tok.save(tmp_path)
    for p in (tmp_path, tmp_path / "tokenizer.json"):
        t2 = load_tokenizer(p)
        assert t2.sha256 == tok.sha256 and t2.encode(DOCS[2]) == tok.encode(DOCS[2])
    before = t2.sha256
    assert t2.add_special_tokens(["<tool>", "<|im_end|>"]) == 1
    assert t2.vocab_size == 401 and t2.sha256 != before and t2.encode("<tool>") == [400]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FurnaceError, match=str(tmp_path / "nope")):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FurnaceError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FurnaceError, match="not a valid"):
        load_tokenizer(tmp_path)


def test_tiktoken_conversion_matches_tiktoken(tok):
    """tiktoken is the reference: a small encoding built from byte ranks, converted, must tokenize identically."""
    import tiktoken
    from data.tokenizer import _bytes_to_unicode
    u2b = {c: b for b, c in _bytes_to_unicode().items()}
    vocab = tok.hf.get_vocab(with_added_tokens=False)
    n_special = len(SPECIAL_TOKENS)
    ranks = {bytes(u2b[c] for c in s): i - n_special for s, i in vocab.items() if i >= n_special}
    enc = tiktoken.Encoding("tiny", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": len(ranks)})
    conv = tiktoken_to_tokenizer(enc, source="tiny")
    assert conv.eos_id == len(ranks) and conv.vocab_size == len(ranks) + 1
    for text in DOCS:
        assert conv.encode_ordinary(text) == enc.encode_ordinary(text)
        assert conv.decode(enc.encode_ordinary(text)) == text


def test_gpt2_offline_is_a_clear_error(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve openaipublic.blob.core.windows.net")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    from data.tokenizer import gpt2_tokenizer
    with pytest.raises(FurnaceError, match="needs network"):
        gpt2_tokenizer()


# ---- shards ------------------------------------------------------------------------------------
def test_header_bytes_match_spec(tmp_path):
    toks = [0, 1, 2, 65535, 50256, 7]
    p = write_shard(tmp_path / "s.bin", toks)
    raw = p.read_bytes()
    assert len(raw) == 1024 + 2 * len(toks)
    header = struct.unpack("<256i", raw[:1024])
    assert header[:3] == (20240520, 1, len(toks)) and not any(header[3:])
    assert raw[1024:] == struct.pack(f"<{len(toks)}H", *toks)


def test_independent_llmc_writer_and_reader(tmp_path):
    toks = np.random.default_rng(0).integers(0, 50257, 1000)
    llmc_write(tmp_path / "a.bin", toks)
    m = read_shard(tmp_path / "a.bin")
    assert isinstance(m, np.memmap) and m.dtype == np.uint16 and np.array_equal(m, toks)
    write_shard(tmp_path / "b.bin", toks)  # ... and the other way: llm.c's reader logic on our file
    with open(tmp_path / "b.bin", "rb") as f:
        header = np.frombuffer(f.read(1024), dtype=np.int32)
        assert header[0] == 20240520 and header[1] == 1
        back = np.frombuffer(f.read(), dtype=np.uint16)
    assert header[2] == len(back) and np.array_equal(back, toks)


def test_uint32_layout_and_no_silent_wrap(tmp_path):
    toks = [0, 65535, 65536, 128255, 3]
    p = write_shard(tmp_path / "big.bin", toks)
    assert struct.unpack("<3i", p.read_bytes()[:12]) == (20240801, 7, 5)
    assert read_shard(p).dtype == np.uint32 and read_shard(p).tolist() == toks
    llmc_write(tmp_path / "l3.bin", toks, magic=20240801, version=7, dtype=np.uint32)
    assert read_shard(tmp_path / "l3.bin").tolist() == toks
    with pytest.raises(FurnaceError, match="token id 128255 does not fit in a uint16"):
        write_shard(tmp_path / "bad.bin", toks, dtype="uint16")
    assert not list(tmp_path.glob("*bad.bin*"))  # nothing half-written
    with pytest.raises(FurnaceError, match="-1 does not fit"):
        write_shard(tmp_path / "neg.bin", [1, -1])


def test_damaged_shards(tmp_path):
    p = write_shard(tmp_path / "s.bin", np.arange(100))
    raw = p.read_bytes()
    cases = {
        "trunc.bin": (raw[:-3], "should be 1224 bytes, but it is 1221"),
        "longer.bin": (raw + b"\0\0", "but it is 1226"),
        "tiny.bin": (raw[:100], "shorter than the 1024-byte header"),
        "magic.bin": (struct.pack("<i", 12345) + raw[4:], "wrong magic number 12345"),
        "version.bin": (raw[:4] + struct.pack("<i", 7) + raw[8:], "expects version 1, found version 7"),
        "zeros.bin": (b"\0" * len(raw), "wrong magic number 0"),
    }
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FurnaceError, match=msg) as e:
            read_shard(tmp_path / name)
        assert name in str(e.value)


# ---- prepare -----------------------------------------------------------------------------------
def test_prepare_round_trip_every_document(tmp_path):
    src = write_docs(tmp_path / "src")
    (src / "empty.txt").write_text("")
    m = prepare(tmp_path / "out", sources=[src], tokenizer="train:350", val_fraction=0.2, shard_tokens=500,
                progress=False, workers=2)
    out = tmp_path / "out"
    tok = load_tokenizer(out)
    assert m == read_manifest(out) and m["tokenizer_sha256"] == tok.sha256
    assert m["vocab_size"] == tok.vocab_size <= 350  # a tiny corpus may not have 350 mergeable pairs
    assert m["special_ids"] == tok.special_ids and m["dtype"] == "uint16"
    assert len(m["shards"]["train"]) > 1 and m["shards"]["val"]  # several shards, non-empty val
    got = {}
    for split in ("train", "val"):
        files = sorted(out.glob(f"{split}_*.bin"))
        assert [f.name for f in files] == [s["file"] for s in m["shards"][split]]
        assert [read_header(f)[0] for f in files] == [s["tokens"] for s in m["shards"][split]]
        toks = np.concatenate([read_shard(f) for f in files])
        assert toks.size == m["tokens"][split]
        got[split] = [tok.decode(d) for d in split_docs(toks, tok.eos_id)]
    assert sorted(got["train"] + got["val"]) == sorted(DOCS)  # every document back, exactly, once
    assert got["val"][0] == DOCS[0] and 0 < len(got["val"]) < len(got["train"])
    assert m["source_stats"]["empty_skipped"] == 1 and m["documents"]["val"] == len(got["val"])
    assert not list(out.glob(".*"))  # no staging or temporary files left


def test_prepare_jsonl_parquet_nonutf8_and_max_tokens(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS[:5])) + "\n\n")
    pq.write_table(pa.table({"body": DOCS[5:10]}), src / "b.parquet")
    (src / "c.txt").write_bytes(b"latin-1 caf\xe9 text")
    m = prepare(tmp_path / "out", sources=[src], tokenizer="train:300", text_field="body", progress=False, workers=1)
    tok = load_tokenizer(tmp_path / "out")
    toks = np.concatenate([read_shard(tmp_path / "out" / s["file"]) for sp in ("val", "train") for s in m["shards"][sp]])
    docs = sorted(tok.decode(d) for d in split_docs(toks, tok.eos_id))
    assert docs == sorted(DOCS[:10] + ["latin-1 caf\ufffd text"])
    assert m["source_stats"]["non_utf8_replaced"] == 1
    m2 = prepare(tmp_path / "capped", sources=[src], tokenizer=str(tmp_path / "out"), text_field="body",
                 max_tokens=123, progress=False, workers=1)
    assert m2["tokens"]["train"] + m2["tokens"]["val"] == 123 and m2["capped"]
    assert m2["tokenizer_sha256"] == m["tokenizer_sha256"]


def test_default_corpus(tmp_path):
    files = default_corpus_files()
    root = stdlib_root()
    assert len(files) > 100 and all(f.suffix == ".py" and f.is_relative_to(root) for f in files)
    parts = {p for f in files for p in f.relative_to(root).parts}
    assert not parts & {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    assert (root / "json" / "decoder.py") in files
    m = prepare(tmp_path / "std", tokenizer="train:512", max_files=12, progress=False, workers=2)
    assert m["sources"][0]["kind"] == "stdlib" and m["sources"][0]["files"] == 12
    assert m["tokens"]["val"] > 0 and m["tokens"]["train"] > m["tokens"]["val"]
    tok = load_tokenizer(tmp_path / "std")
    first = read_shard(tmp_path / "std" / "val_000000.bin")
    assert tok.decode(split_docs(np.asarray(first), tok.eos_id)[0]) == files[0].read_text()


def test_interrupted_run_leaves_nothing_complete(tmp_path):
    src = write_docs(tmp_path / "src")
    (src / "zz.jsonl").write_text('{"text": "fine"}\n{"nope": 1}\n')  # fails after the .txt shards were written
    with pytest.raises(FurnaceError, match=r"zz.jsonl:2: no 'text' field"):
        prepare(tmp_path / "new" / "out", sources=[src], tokenizer="train:300", shard_tokens=100, progress=False,
                workers=1)
    assert sorted(tmp_path.iterdir()) == [src]                # removed again
    assert not (tmp_path / "new").exists()                    # the folders the failed run created are gone too
    (tmp_path / "kept").mkdir()
    with pytest.raises(FurnaceError):
        prepare(tmp_path / "kept", sources=[src], tokenizer="train:300", shard_tokens=100, progress=False, workers=1)
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []  # it existed before: kept
    good = prepare(tmp_path / "good", sources=[write_docs(tmp_path / "s2")], tokenizer="train:300", progress=False)
    before = {f.name: f.read_bytes() for f in (tmp_path / "good").iterdir()}
    with pytest.raises(FurnaceError, match="already holds prepared data"):
        prepare(tmp_path / "good", sources=[src], progress=False)
    assert {f.name: f.read_bytes() for f in (tmp_path / "good").iterdir()} == before and good


def test_prepare_raw_uint16(tmp_path, tok):
    tok.save(tmp_path / "tk")
    eos = tok.eos_id
    docs = [tok.encode_ordinary(d) for d in DOCS]
    flat = np.array([t for d in docs for t in [eos] + d], dtype=np.uint16)
    flat.tofile(tmp_path / "train.bin")
    m = prepare(tmp_path / "out", sources=[tmp_path / "train.bin"], tokenizer=str(tmp_path / "tk"),
                raw_uint16=True, val_fraction=0.3, progress=False)
    tr, va = (np.concatenate([read_shard(tmp_path / "out" / s["file"]) for s in m["shards"][k]]) for k in ("train", "val"))
    assert np.array_equal(np.concatenate([tr, va]), flat) and va[0] == eos and tr.size > va.size > 0


# ---- CLI: every bad input is one `error:` line, no traceback, nothing written --------------------
def test_cli_bad_inputs(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "x"}\n')
    (tmp_path / "odd.bin").write_bytes(b"\1\0\2")
    np.array([1, 2, 70000 % 65536, 399, 400], dtype=np.uint16).tofile(tmp_path / "big.bin")
    tok.save(tmp_path / "tk")
    cases = [
        (["--source", tmp_path / "empty"], ["no documents with text", "empty source"]),
        (["--source", tmp_path / "missing"], ["--source", "no such file"]),
        (["--source", tmp_path / "bad.jsonl"], ["bad.jsonl:2", "'text'", "--text-field"]),
        (["--source", tmp_path / "odd.bin", "--raw-uint16", "--tokenizer", tmp_path / "tk"], ["odd.bin", "uint16"]),
        (["--source", tmp_path / "big.bin", "--raw-uint16", "--tokenizer", tmp_path / "tk"], ["big.bin", "400", "vocabulary of 400"]),
        (["--hf", "HuggingFaceFW/fineweb-edu", "--hf-config", "sample-10BT"], ["needs network", "--source"]),
    ]
    procs = []
    for i, (args, _) in enumerate(cases):
        env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        procs.append(subprocess.Popen([sys.executable, PREPARE, "--no-progress", "--out", str(tmp_path / f"o{i}"),
                                       *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd="/", env={**os.environ, **env}))
    for (args, needles), (i, p) in zip(cases, enumerate(procs)):
        _, err = p.communicate(timeout=120)
        assert_cli_error(subprocess.CompletedProcess(args, p.returncode, "", err), *needles)
        out = tmp_path / f"o{i}"
        assert not out.exists() or not list(out.iterdir()), list(out.iterdir())


def test_cli_non_utf8_is_reported_not_fatal(tmp_path):
    src = write_docs(tmp_path / "src", DOCS[:4])
    (src / "bin.txt").write_bytes(b"\xff\xfe caf\xe9")
    r = run_prepare("--out", tmp_path / "o", "--source", src, "--tokenizer", "train:300")
    assert r.returncode == 0, r.stderr
    assert "1 non-UTF-8 files/lines decoded with replacement characters" in r.stderr and "bin.txt" in r.stderr
    assert read_manifest(tmp_path / "o")["source_stats"]["non_utf8_replaced"] == 1
