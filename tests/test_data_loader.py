"""TokenLoader: window contents, resume, DDP ranks, mixing weights, errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data import TokenLoader, check_tokenizer_match, parse_data_arg, write_shard
from kernels.common import FurnaceError


def make_folder(d: Path, shards: dict, sha="a" * 64, vocab=65536) -> Path:
    """A prepared-looking folder whose tokens are known: {'train': [array, ...], 'val': [...]}."""
    d.mkdir(parents=True)
    entries = {}
    for split, arrays in shards.items():
        entries[split] = []
        for i, a in enumerate(arrays):
            write_shard(d / f"{split}_{i:06d}.bin", a)
            entries[split].append({"file": f"{split}_{i:06d}.bin", "tokens": len(a)})
    (d / "manifest.json").write_text(json.dumps({
        "format": "furnace-token-shards", "version": 1, "tokenizer_sha256": sha, "vocab_size": vocab,
        "eos_id": 0, "special_ids": {}, "shards": entries}))
    return d


@pytest.fixture
def folder(tmp_path):
    # token value == global position (+ a shard tag in the high range), so every row says where it came from
    return make_folder(tmp_path / "d", {"train": [np.arange(0, 3001), np.arange(10000, 12500)],
                                        "val": [np.arange(20000, 21000)]})


def starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def test_windows_are_contiguous_slices_with_shifted_targets(folder):
    T = 100
    data = {0: np.arange(0, 3001), 10000: np.arange(10000, 12500)}
    L = TokenLoader([(folder, 1.0)], batch_size=4, seq_len=T)
    for i in range(40):  # 54 windows per epoch: batches 14+ are in the second epoch (shifted grid)
        x, y = L.next_batch()
        assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            base = 10000 if row_x[0] >= 10000 else 0
            s = row_x[0] - base
            if i < 13:
                assert s % T == 0  # windows start on the stride grid in the first epoch
            assert row_x == data[base][s:s + T].tolist() and row_y == data[base][s + 1:s + T + 1].tolist()


def test_random_epoch_visits_every_window_once(folder):
    T, B = 100, 6  # 54 windows = 9 batches
    L = TokenLoader([(folder, 1.0)], batch_size=B, seq_len=T, seed=3)
    n = (3000 // T) + (2499 // T)  # windows of T+1 with stride T per shard
    assert L.windows_per_rank() == n
    seen = [s for _ in range(n // B) for s in starts(L.next_batch()[0])]
    expected = [i * T for i in range(3000 // T)] + [10000 + i * T for i in range(2499 // T)]
    assert sorted(seen) == expected and seen != expected  # all of them, shuffled
    L2 = TokenLoader([(folder, 1.0)], batch_size=B, seq_len=T, seed=4)
    assert [s for _ in range(n // B) for s in starts(L2.next_batch()[0])] != seen  # the seed matters


def test_resume_gives_identical_batches(folder, tmp_path):
    other = make_folder(tmp_path / "o", {"train": [np.arange(40000, 41000)], "val": [np.arange(50000, 50500)]})
    for mode in ("random", "sequential"):
        kw = dict(batch_size=3, seq_len=64, seed=1, mode=mode)
        ref = TokenLoader([(folder, 0.6), (other, 0.4)], **kw)
        batches = [ref.next_batch() for _ in range(120)]  # several epochs of the small source
        for cut in (1, 37, 90):
            L = TokenLoader([(folder, 0.6), (other, 0.4)], **kw)
            for _ in range(cut):
                L.next_batch()
            state = json.loads(json.dumps(L.state_dict()))  # JSON-able
            R = TokenLoader([(folder, 0.6), (other, 0.4)], **kw)
            R.load_state_dict(state)
            for i in range(cut, 120):
                x, y = R.next_batch()
                assert torch.equal(x, batches[i][0]) and torch.equal(y, batches[i][1]), (mode, cut, i)
    with pytest.raises(FurnaceError, match="saved with seq_len=64 but this loader has seq_len=32"):
        TokenLoader([(folder, 1.0)], batch_size=3, seq_len=32, mode="sequential", seed=1).load_state_dict(state)


def test_ddp_ranks_disjoint(folder):
    T, B, W = 50, 4, 3
    per_rank = {}
    for r in range(W):
        L = TokenLoader([(folder, 1.0)], batch_size=B, seq_len=T, rank=r, world_size=W, seed=7)
        n = L.windows_per_rank()
        per_rank[r] = [s for _ in range(n // B) for s in starts(L.next_batch()[0])]
        assert len(set(per_rank[r])) == len(per_rank[r])
    for a in range(W):
        for b in range(a + 1, W):
            assert not set(per_rank[a]) & set(per_rank[b])
    for r in range(W):  # sequential validation is split between ranks too
        V = TokenLoader([(folder, 1.0)], batch_size=2, seq_len=T, split="val", mode="sequential", rank=r, world_size=W)
        assert starts(V.next_batch()[0]) == [20000 + (r + W * i) * T for i in range(2)]


def test_mixing_weights_respected(tmp_path):
    a = make_folder(tmp_path / "a", {"train": [np.arange(0, 5000) % 1000], "val": [np.arange(300)]})
    b = make_folder(tmp_path / "b", {"train": [30000 + np.arange(0, 5000) % 1000], "val": [np.arange(300)]})
    L = TokenLoader(parse_data_arg(f"{a}:0.7,{b}:0.3"), batch_size=8, seq_len=16, seed=0)
    rows = np.concatenate([L.next_batch()[0][:, 0].numpy() for _ in range(1000)])
    frac_a = float((rows < 30000).mean())  # 8000 rows: std of the fraction ~ 0.005
    assert abs(frac_a - 0.7) < 0.02, frac_a


def test_sequential_validation_and_reset(folder):
    V = TokenLoader([(folder, 1.0)], batch_size=2, seq_len=100, split="val", mode="sequential")
    assert V.batches_per_epoch == (999 // 100) // 2
    first = [V.next_batch()[0] for _ in range(V.batches_per_epoch)]
    assert [s for x in first for s in starts(x)] == [20000 + 100 * i for i in range(8)]
    V.reset()
    assert all(torch.equal(V.next_batch()[0], f) for f in first)


def test_parse_data_arg():
    assert parse_data_arg("a:0.7,b:0.3") == [("a", 0.7), ("b", 0.3)]
    assert parse_data_arg("data/stdlib") == [("data/stdlib", 1.0)]
    assert parse_data_arg("x:y") == [("x:y", 1.0)]
    for bad in ("", "a:-1", "a:0"):
        with pytest.raises(FurnaceError):
            parse_data_arg(bad)


def test_errors(folder, tmp_path):
    with pytest.raises(FurnaceError) as e:
        TokenLoader([(folder, 1.0)], batch_size=1, seq_len=1000, split="val")
    assert str(folder) in str(e.value) and "val" in str(e.value) and "1001" in str(e.value) and "1000 tokens" in str(e.value)
    other = make_folder(tmp_path / "o", {"train": [np.arange(500)], "val": [np.arange(500)]}, sha="b" * 64)
    with pytest.raises(FurnaceError, match="different tokenizers") as e:
        TokenLoader([(folder, 1.0), (other, 1.0)], batch_size=1, seq_len=10)
    assert str(folder) in str(e.value) and str(other) in str(e.value)
    with pytest.raises(FurnaceError, match=r"tokenizer mismatch: data x .*aaaaaaaaaaaa.* checkpoint y .*bbbbbbbbbbbb"):
        check_tokenizer_match("a" * 64, "b" * 64, "data x", "checkpoint y")
    check_tokenizer_match("a" * 64, "a" * 64, "data x", "checkpoint y")
    # a damaged shard is refused when the loader opens the folder, naming the file
    p = folder / "train_000001.bin"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(FurnaceError, match="train_000001.bin"):
        TokenLoader([(folder, 1.0)], batch_size=1, seq_len=10)
    with pytest.raises(FurnaceError, match="no such folder"):
        TokenLoader([(tmp_path / "missing", 1.0)], batch_size=1, seq_len=10)


def test_reads_llmc_folder_as_is(tmp_path):
    """A modded-nanogpt/llm.c FineWeb-style folder (no manifest) written by an independent writer."""
    d = tmp_path / "fineweb10B"
    d.mkdir()
    for name, toks in (("fineweb_val_000000.bin", np.arange(500, 900)), ("fineweb_train_000001.bin", np.arange(1000, 2000))):
        header = np.zeros(256, dtype=np.int32)
        header[:3] = (20240520, 1, len(toks))
        (d / name).write_bytes(header.tobytes() + toks.astype(np.uint16).tobytes())
    L = TokenLoader([(d, 1.0)], batch_size=2, seq_len=10, mode="sequential")
    x, y = L.next_batch()
    assert x.tolist() == [list(range(1000, 1010)), list(range(1010, 1020))] and y[0, -1] == 1010
    assert L.tokenizer_sha256 is None and L.vocab_size is None
    V = TokenLoader([(d, 1.0)], batch_size=1, seq_len=10, split="val", mode="sequential")
    assert V.next_batch()[0].tolist() == [list(range(500, 510))]
