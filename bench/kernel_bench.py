"""Kernel benchmark: each kernel's forward, backward and both at the 112m and 1b preset shapes, as median
time, achieved GB/s and % of the device's peak memory bandwidth, next to eager PyTorch (the `_ref`
functions), torch.compile of them and Liger (when installed). Plus the fused linear+cross-entropy memory
comparison, which is measurable on CPU. Timings need a CUDA GPU: without one the script says so and
reports the memory figures. The last stdout line is one JSON document.

    python bench/kernel_bench.py                      # everything this machine can measure
    python bench/kernel_bench.py --memory-only        # the fused linear+CE memory comparison
    python bench/kernel_bench.py --memory-shape 8192,768,49152   # the full comparison (CPU: ~8.4 GB peak)
The memory comparison's default shape fits a small machine on CPU (N=1024 tokens: peak under 2 GB, tested);
on CUDA it is the full 8192-token batch of the 112m preset.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels.cross_entropy import cross_entropy_ref  # noqa: E402
from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy_ref  # noqa: E402
from kernels.rms_norm import rms_norm_ref  # noqa: E402
from kernels.rope import apply_rope_ref  # noqa: E402
from kernels.swiglu import swiglu_ref  # noqa: E402
from model.config import get_preset  # noqa: E402
from bench.common import peak_rss_bytes, rss_bytes  # noqa: E402
from kernels.common import FurnaceError, run_cli  # noqa: E402
from model.flops import PEAK_GBPS, device_peak_name  # noqa: E402

log = logging.getLogger("furnace")

CUDA_MEMORY_SHAPE, CPU_MEMORY_SHAPE = "8192,768,49152", "1024,768,49152"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- cases
def cases(preset: str, tokens: int, seq_len: int, dtype, device):
    """Yield (op, make_inputs, {impl: fn}, bytes_fwd, bytes_bwd, grad_of). Bytes are the minimal traffic
    of a fused kernel: inputs read once and outputs written once (the same model for every impl)."""
    cfg = get_preset(preset)
    d, hd, ffn, V = cfg.n_embd, cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size
    B, T = max(1, tokens // seq_len), seq_len
    es = torch.finfo(dtype).bits // 8
    n = B * T

    def rn(*shape, scale=1.0):
        return lambda: torch.randn(*shape, device=device, dtype=dtype) * scale

    liger = _liger_available()
    tab = torch.outer(torch.arange(T, dtype=torch.float32, device=device),
                      1e-4 ** torch.linspace(0, 1, hd // 2, device=device))  # (T, hd/2)
    cos, sin = tab.cos(), tab.sin()
    tgt = torch.randint(0, V, (n,), device=device)

    def impls(ref, api):
        out = {"eager": ref, "compile": torch.compile(ref), "triton": lambda *a: api(*a, impl="triton")}
        if liger:
            out["liger"] = lambda *a: api(*a, impl="liger")
        return out

    w = torch.ones(d, device=device, dtype=dtype)
    yield ("rms_norm", lambda: [rn(n, d)(), w.clone()],
           impls(lambda x, w: rms_norm_ref(x, w), lambda x, w, impl: kernels.rms_norm(x, w, impl=impl)),
           2 * n * d * es, 3 * n * d * es, [0, 1])
    yield ("apply_rope", lambda: [rn(B, T, cfg.n_head, hd)()],
           impls(lambda x: apply_rope_ref(x, cos, sin), lambda x, impl: kernels.apply_rope(x, cos, sin, impl=impl)),
           2 * n * d * es, 2 * n * d * es, [0])
    yield ("swiglu", lambda: [rn(n, ffn)(), rn(n, ffn)()],
           impls(swiglu_ref, lambda g, u, impl: kernels.swiglu(g, u, impl=impl)),
           3 * n * ffn * es, 5 * n * ffn * es, [0, 1])
    yield ("cross_entropy", lambda: [rn(n, V, scale=2.0)()],
           impls(lambda x: cross_entropy_ref(x, tgt), lambda x, impl: kernels.cross_entropy(x, tgt, impl=impl)),
           n * V * es, n * V * es, [0])
    yield ("fused_linear_cross_entropy", lambda: [rn(n, d)(), rn(V, d, scale=0.02)()],
           impls(lambda h, w: fused_linear_cross_entropy_ref(h, w, tgt),
                 lambda h, w, impl: kernels.fused_linear_cross_entropy(h, w, tgt, impl=impl)),
           None, None, [0, 1])  # matmul-bound: reported in TFLOP/s (6 N D V per fwd+bwd)


def _liger_available() -> bool:
    from kernels._dispatch import liger_module  # noqa: PLC0415
    try:
        liger_module()
        return True
    except FurnaceError as e:
        log.info(f"Liger: not compared ({str(e)[:100]})")
        return False


# ----------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op(fn, make_inputs, grad_of, mode, device, warmup, iters):
    """Median / 20th / 80th percentile milliseconds of fwd, bwd (backward only) or both."""
    times = []
    for i in range(warmup + iters):
        xs = [t.requires_grad_(j in grad_of and mode != "fwd") for j, t in enumerate(make_inputs())]
        _sync(device)
        t0 = time.perf_counter()
        out = fn(*xs)
        if mode == "bwd":
            dy = torch.ones_like(out) if out.dim() else None
            _sync(device)
            t0 = time.perf_counter()
            out.backward(dy)
        elif mode == "both":
            out.backward(torch.ones_like(out) if out.dim() else None)
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[-1]


def run_timings(args, device):
    dtype = DTYPES[args.dtype]
    peak = PEAK_GBPS.get(device_peak_name(torch.cuda.get_device_name(device)) or "") if device.type == "cuda" \
        else None
    rows = []
    for preset in args.presets.split(","):
        for op, make, fns, b_fwd, b_bwd, grad_of in cases(preset, args.tokens, args.seq_len, dtype, device):
            if args.ops and op not in args.ops.split(","):
                continue
            for mode in ("fwd", "bwd", "both"):
                eager_ms = None
                for impl, fn in fns.items():
                    try:
                        med, p20, p80 = time_op(fn, make, grad_of, mode, device, args.warmup, args.iters)
                    except Exception as e:  # OOM, a torch.compile failure, ...: recorded in the report, go on
                        log.info(f"{preset} {op} {mode} {impl}: failed ({type(e).__name__}: {str(e)[:120]})")
                        rows.append(dict(preset=preset, op=op, mode=mode, impl=impl, error=str(e)[:200]))
                        continue
                    eager_ms = med if impl == "eager" else eager_ms
                    row = dict(preset=preset, op=op, mode=mode, impl=impl, median_ms=round(med, 4),
                               p20_ms=round(p20, 4), p80_ms=round(p80, 4))
                    nbytes = {"fwd": b_fwd, "bwd": b_bwd, "both": (b_fwd or 0) + (b_bwd or 0)}[mode]
                    if b_fwd is not None:
                        row["gb_per_s"] = round(nbytes / med / 1e6, 1)
                        row["pct_peak_bw"] = round(100 * row["gb_per_s"] / peak, 1) if peak else None
                    else:
                        cfg = get_preset(preset)
                        n = max(1, args.tokens // args.seq_len) * args.seq_len
                        flops = {"fwd": 2, "bwd": 4, "both": 6}[mode] * n * cfg.n_embd * cfg.vocab_size
                        row["tflops"] = round(flops / med / 1e9, 1)
                    row["speedup_vs_eager"] = round(eager_ms / med, 2) if eager_ms else None
                    rows.append(row)
                    log.info(" ".join(f"{k}={v}" for k, v in row.items()))
    return rows


# ----------------------------------------------------------------------------- memory (CPU or CUDA)
def memory_child(path: str, n: int, d: int, v: int) -> None:
    """In a fresh process: peak extra memory of one forward+backward of `path` (fused | materialised),
    fp32, over the memory held once the inputs exist. Prints MiB."""
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h = torch.randn(n, d, device=dev, requires_grad=True)
    w = (torch.randn(v, d, device=dev) * 0.02).requires_grad_()
    t = torch.randint(0, v, (n,), device=dev)
    impl = "auto"  # CUDA: the Triton kernel; CPU: the chunked PyTorch path
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    loss = (fused_linear_cross_entropy_ref(h, w, t) if path == "materialised"
            else kernels.fused_linear_cross_entropy(h, w, t, impl=impl))
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    print(json.dumps({"path": path, "extra_mib": round((peak - base) / 2**20, 1), "loss": loss.item(),
                      "device": dev.type}))


def run_memory(shape: str) -> dict:
    n, d, v = (int(s) for s in shape.split(","))
    res = {"shape": {"N": n, "D": d, "V": v}, "dtype": "fp32"}
    for path in ("materialised", "fused"):
        env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
        out = subprocess.run([sys.executable, __file__, "--memory-child", path, str(n), str(d), str(v)],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"memory child ({path}) failed: {out.stderr[-800:]}")
        child = json.loads(out.stdout.strip().splitlines()[-1])
        res[f"{path}_mib"] = child["extra_mib"]
        res[f"{path}_loss"] = child["loss"]
        res["device"] = child["device"]
    res["ratio"] = round(res["fused_mib"] / res["materialised_mib"], 4)
    res["method"] = ("torch.cuda.max_memory_allocated" if res["device"] == "cuda" else
                     "max RSS of a fresh process minus RSS once the inputs exist")
    log.info(f"fused linear+CE memory {shape} fp32 ({res['device']}): materialised {res['materialised_mib']} MiB, "
             f"fused {res['fused_mib']} MiB, ratio {res['ratio']}")
    return res


# ----------------------------------------------------------------------------- main
def conditions(args) -> dict:
    from train.metrics import run_record  # noqa: PLC0415  (reads triton's version from its metadata, no import)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dict(**run_record(dev), dtype=args.dtype, tokens=args.tokens, seq_len=args.seq_len, presets=args.presets,
                warmup=args.warmup, iters=args.iters)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="112m,1b", help="comma-separated model presets whose shapes to use; default: 112m,1b")
    p.add_argument("--ops", default="", help="comma-separated subset of ops (default: all)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="dtype of the timed kernels; default: bf16")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B*T) for the timings; default: 16384")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for RoPE and attention shapes; default: 2048")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing each kernel; default: 5")
    p.add_argument("--iters", type=int, default=20, help="timed calls per kernel (median reported); default: 20")
    p.add_argument("--memory-only", action="store_true", help="only the fused linear+CE memory comparison; default: off")
    p.add_argument("--memory-shape", default="", help="N,D,V (tokens, hidden, vocab) for the memory comparison; "
                   f"default: {CUDA_MEMORY_SHAPE} on CUDA, {CPU_MEMORY_SHAPE} on CPU (the full one needs ~8.4 GB)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory comparison; default: off")
    p.add_argument("--memory-child", nargs=4, metavar=("PATH", "N", "D", "V"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        path, n, d, v = args.memory_child
        return memory_child(path, int(n), int(d), int(v))
    args.memory_shape = args.memory_shape or (CUDA_MEMORY_SHAPE if torch.cuda.is_available() else CPU_MEMORY_SHAPE)
    if len(args.memory_shape.split(",")) != 3:
        raise FurnaceError(f"--memory-shape {args.memory_shape!r}: expected N,D,V such as 8192,768,49152")
    report = {"conditions": conditions(args), "timings": [], "memory": None, "notes": []}
    if not args.memory_only:
        if torch.cuda.is_available():
            report["timings"] = run_timings(args, torch.device("cuda"))
        else:
            msg = ("no CUDA device: the Triton kernels need a GPU to be timed (the interpreter is a correctness "
                   "tool, not a benchmark); reporting the CPU memory comparison only")
            log.info(msg)
            report["notes"].append(msg)
    if not args.no_memory:
        report["memory"] = run_memory(args.memory_shape)
    # this machine's peak memory for the whole run is at most this process's peak plus its largest child's
    # (the memory children run one at a time)
    # (a child's ru_maxrss may include this process's size when it was spawned: an over-estimate, kept as a bound)
    own, child = peak_rss_bytes(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    report["peak_rss_mib"] = {"self": round(own / 2**20, 1), "largest_child": round(child / 2**20, 1),
                              "bound": round((own + child) / 2**20, 1)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    run_cli(main)
