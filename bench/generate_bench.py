"""The measurements behind bench/generate.py (see its docstring)."""
from __future__ import annotations

import copy
import functools
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from infer.decode import Decoder
from infer.generation import generate
from infer.export_hf import export_hf
from infer.quant import Int8Linear, quantize, weight_bytes_per_token
from infer.runtime import set_threads
from model.config import get_preset
from kernels.common import FurnaceError
from model.gpt import GPT


def matvec_gbps(mode: str = "fp32", mib: int = 256, reps: int = 20) -> float:
    """Weight bytes per second streamed by one matrix-vector product over a `mib` MiB matrix (median): fp32 and
    bf16 through F.linear, int8 through our Int8Linear (FBGEMM). Far larger than any cache."""
    elem = {"fp32": 4, "bf16": 2, "int8": 1}[mode]
    n = int((mib * 2**20 / elem) ** 0.5)
    w = torch.randn(n, n)
    if mode == "int8":
        lin, x = Int8Linear(w), torch.randn(1, n)
    else:
        dt = torch.float32 if mode == "fp32" else torch.bfloat16
        w, x = w.to(dt), torch.randn(1, n, dtype=dt)
        lin = functools.partial(F.linear, weight=w)
    ts = []
    with torch.inference_mode():
        for i in range(reps + 3):
            t = time.perf_counter()
            lin(x)
            if i >= 3:
                ts.append(time.perf_counter() - t)
    return n * n * elem / statistics.median(ts) / 1e9


def _ours(decoder, prompt, n):
    stamps = []
    t0 = time.perf_counter()
    generate(decoder.model, prompt, n, on_token=lambda _: stamps.append(time.perf_counter()), decoder=decoder)
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])


class _Stamps:
    """transformers streamer: records when each new token arrives (its first put() is the prompt)."""

    def __init__(self):
        self.t, self.first = [], True

    def put(self, value):
        if self.first:
            self.first = False
            return
        self.t.append(time.perf_counter())

    def end(self):
        pass


def _hf(model, prompt, n):
    s = _Stamps()
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, streamer=s, pad_token_id=0, eos_token_id=None)
    return s.t[0] - t0, (len(s.t) - 1) / (s.t[-1] - s.t[0])


def _conditions(threads: int) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except OSError:
        commit = None
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import transformers
        tv = transformers.__version__
    except ImportError:
        tv = None
    return {"cpu": cpu, "threads": threads, "torch": torch.__version__, "transformers": tv, "commit": commit,
            "loadavg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def run_bench(args) -> int:
    threads = set_threads(args.threads)
    modes = [m for m in args.dtypes.split(",") if m]
    hf_modes = [m for m in args.hf_dtypes.split(",") if m]
    if args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1:
        raise FurnaceError("--prompt-len >= 1, --new-tokens >= 2 and --repeats >= 1 are required")
    compile_choices = {"both": (False, True), "on": (True,), "off": (False,)}.get(args.compile)
    if compile_choices is None:
        raise FurnaceError(f"--compile {args.compile}: expected both, on or off")
    cond = _conditions(threads)
    # The bound uses the best streaming rate measured on this machine, whichever kernel reached it.
    per_mode = {m: matvec_gbps(m) for m in ("fp32", "bf16", "int8")}
    gbps = max(per_mode.values())
    cond.update({f"matvec_{m}_GBps": v for m, v in per_mode.items()})
    cond["bound_GBps"] = gbps
    print(f"# {cond['cpu']}, {threads} threads, torch {cond['torch']}, transformers {cond['transformers']}, "
          f"load {cond['loadavg_1m_at_start']}; matrix-vector GB/s "
          f"{', '.join(f'{m} {v:.1f}' for m, v in per_mode.items())} -> bound at {gbps:.1f} GB/s; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, median of {args.repeats}", flush=True)
    rows = []
    header = (f"{'preset':6} {'impl':15} {'dtype':5} {'weights MB':>10} {'TTFT ms':>8} {'decode tok/s':>12} "
              f"{'bound tok/s':>11} {'% of bound':>10}")
    print(header, flush=True)

    def add(r):
        r["pct_of_bound"] = 100 * r["decode_tok_s"] / r["bound_tok_s"]
        rows.append(r)
        print(f"{r['preset']:6} {r['impl']:15} {r['dtype']:5} {r['weight_MB']:10.1f} {r['ttft_ms']:8.1f} "
              f"{r['decode_tok_s']:12.1f} {r['bound_tok_s']:11.1f} {r['pct_of_bound']:9.0f}%", flush=True)

    for preset in [p for p in args.presets.split(",") if p]:
        cfg = get_preset(preset)
        cfg.kernels = "torch"
        torch.manual_seed(0)
        base = GPT(cfg).eval()
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        variants = []  # (row, fn, model or our Decoder)
        for mode in modes:
            for compiled in compile_choices:
                m = quantize(copy.deepcopy(base), mode)
                wb = weight_bytes_per_token(m)
                row = {"impl": "furnace+compile" if compiled else "furnace", "preset": preset, "dtype": mode,
                       "weight_MB": wb / 1e6, "bound_tok_s": gbps * 1e9 / wb}
                dec = Decoder(m)
                if compiled:
                    t = time.perf_counter()
                    if not dec.compile():
                        raise FurnaceError("--compile: compiling the decode step failed (see the log line above)")
                    row["compile_s"] = time.perf_counter() - t
                variants.append((row, _ours, dec))
        if hf_modes:
            import transformers
            with tempfile.TemporaryDirectory() as tmp:
                export_hf(base, Path(tmp) / "hf")
                for mode in hf_modes:
                    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[mode]
                    hf = transformers.AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "hf"), dtype=dt).eval()
                    wb = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if "embed" not in n
                             and "norm" not in n)
                    if cfg.tie_embeddings:
                        wb += hf.lm_head.weight.numel() * hf.lm_head.weight.element_size()
                    variants.append(({"impl": "transformers", "preset": preset, "dtype": mode, "weight_MB": wb / 1e6,
                                      "bound_tok_s": gbps * 1e9 / wb}, _hf, hf))
        # Round-robin over the variants so that drifting machine load hits them all alike.
        runs = [[] for _ in variants]
        for rep in range(args.repeats + 1):                                # the first round is the warm-up
            for i, (_, fn, model) in enumerate(variants):
                r = fn(model, prompt, args.new_tokens)
                if rep:
                    runs[i].append(r)
        for (row, _, _), rs in zip(variants, runs):
            ttft = [r[0] * 1e3 for r in rs]
            tps = [r[1] for r in rs]
            add({**row, "ttft_ms": statistics.median(ttft), "ttft_ms_range": [min(ttft), max(ttft)],
                 "decode_tok_s": statistics.median(tps), "decode_tok_s_range": [min(tps), max(tps)]})
        del variants, base
    print(json.dumps({"conditions": cond, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                      "repeats": args.repeats, "rows": rows}))
    return 0
