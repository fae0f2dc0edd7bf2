"""Data pipeline throughput: `python bench/data_bench.py`.

1. prepare: the embedded default corpus (this Python's stdlib) -> BPE train:4096 -> shards,
   reported as source MB/s and tokens/s on all cores (tokenizer training timed separately).
2. loader: TokenLoader tokens/s at B=8, T=2048 (random windows, CPU tensors, one torch thread),
   against a nanoGPT-style `np.memmap` get_batch on the same shards measured in the same run.
   Target (issue 4): >= 20 x 196k tok/s (Elite-112M on one RTX 5090) from one core, and never
   slower than the nanoGPT-style get_batch. RSS is sampled to show memory stays flat.
The last stdout line is one JSON document.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from kernels.common import run_cli  # noqa: E402

TARGET_TOK_S = 20 * 196_000


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_prepare(out: Path, max_files, workers: int) -> dict:
    import time

    from data.build import prepare
    from data.sources import default_corpus_files
    files = default_corpus_files(max_files)
    nbytes = sum(f.stat().st_size for f in files)
    t0 = time.perf_counter()
    m = prepare(out, tokenizer="train:4096", max_files=max_files, workers=workers, progress=False, overwrite=True)
    total = time.perf_counter() - t0
    encode = m["seconds"]  # prepare's own timing of the encode + write phase (tokenizer training excluded)
    tokens = m["tokens"]["train"] + m["tokens"]["val"]
    return {"files": len(files), "source_mb": round(nbytes / 1e6, 2), "tokens": tokens,
            "total_s": round(total, 2), "tokenizer_train_s": round(total - encode, 2), "encode_write_s": encode,
            "mb_per_s": round(nbytes / 1e6 / total, 2), "tok_per_s": round(tokens / total),
            "encode_tok_per_s": round(tokens / encode)}


def _time_batches(fn, batches: int, trials: int, B: int, T: int) -> dict:
    import statistics
    import time
    for _ in range(20):  # warm-up (page cache, allocator)
        fn()
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(batches):
            fn()
        rates.append(batches * B * T / (time.perf_counter() - t0))
    return {"tok_per_s_median": round(statistics.median(rates)), "tok_per_s_min": round(min(rates)),
            "tok_per_s_max": round(max(rates)), "trials": trials, "batches_per_trial": batches}


def bench_loader(data_dir: Path, B: int, T: int, batches: int, trials: int) -> dict:
    import numpy as np
    import torch

    from data.build import read_manifest
    from data.loader import TokenLoader
    from data.shards import HEADER_BYTES
    torch.set_num_threads(1)
    loader = TokenLoader([(data_dir, 1.0)], batch_size=B, seq_len=T, seed=0)
    rss0 = _rss_mb()
    ours = _time_batches(loader.next_batch, batches, trials, B, T)
    rss1 = _rss_mb()

    shard = data_dir / read_manifest(data_dir)["shards"]["train"][0]["file"]

    def nanogpt_get_batch():
        # nanoGPT train.py: re-create the memmap every batch (its fix for the memmap leak)
        data = np.memmap(shard, dtype=np.uint16, mode="r", offset=HEADER_BYTES)
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    ref = _time_batches(nanogpt_get_batch, batches, trials, B, T)
    return {"B": B, "T": T, "torch_threads": 1, "device": "cpu", "mode": "random",
            "furnace": ours, "nanogpt_memmap": ref,
            "rss_mb_before": round(rss0, 1), "rss_mb_after": round(rss1, 1),
            "speedup_vs_nanogpt": round(ours["tok_per_s_median"] / ref["tok_per_s_median"], 2)}


def main(argv=None):
    import os
    import tempfile
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="prepared folder to reuse for the loader bench (skips prepare); default: prepare the stdlib corpus")
    ap.add_argument("--out", default=None, help="where to prepare the default corpus (default: a temp folder)")
    ap.add_argument("--max-files", type=int, default=None, help="prepare only the first N stdlib files; default: all of them")
    ap.add_argument("--workers", type=int, default=None, help="prepare processes (default: all cores)")
    ap.add_argument("--batches", type=int, default=500, help="batches per timing trial; default: 500")
    ap.add_argument("--trials", type=int, default=5, help="timing trials (the median is reported); default: 5")
    args = ap.parse_args(argv)
    workers = args.workers or os.cpu_count() or 1
    from train.metrics import run_record
    result = {"bench": "data", "conditions": {**run_record("cpu"), "prepare_workers": workers}}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data) if args.data else Path(args.out or Path(tmp) / "stdlib")
        if not args.data:
            result["prepare"] = p = bench_prepare(data_dir, args.max_files, workers)
            print(f"prepare: {p['files']} files, {p['source_mb']} MB -> {p['tokens']:,} tokens in {p['total_s']} s "
                  f"({p['mb_per_s']} MB/s, {p['tok_per_s']:,} tok/s; tokenizer training {p['tokenizer_train_s']} s, "
                  f"encode+write {p['encode_tok_per_s']:,} tok/s on {workers} workers)")
        result["loader"] = lo = bench_loader(data_dir, 8, 2048, args.batches, args.trials)
    ours, ref = lo["furnace"]["tok_per_s_median"], lo["nanogpt_memmap"]["tok_per_s_median"]
    result["target_tok_per_s"] = TARGET_TOK_S
    result["meets_target"] = ours >= TARGET_TOK_S
    result["faster_than_nanogpt"] = ours >= ref
    print(f"loader B=8 T=2048, 1 thread: {ours / 1e6:.1f}M tok/s (min {lo['furnace']['tok_per_s_min'] / 1e6:.1f}M) vs "
          f"nanoGPT memmap get_batch {ref / 1e6:.1f}M tok/s ({lo['speedup_vs_nanogpt']}x); RSS "
          f"{lo['rss_mb_before']} -> {lo['rss_mb_after']} MB")
    print(f"target 20 x 196k = {TARGET_TOK_S / 1e6:.2f}M tok/s from one core: {'MET' if result['meets_target'] else 'NOT MET'}; "
          f"not slower than nanoGPT-style get_batch: {'YES' if result['faster_than_nanogpt'] else 'NO'}")
    import json
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_cli(main)
