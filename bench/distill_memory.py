"""Peak extra memory of the distillation loss: chunked (kernels/fused_linear_distill.py) vs materialised
(`fused_linear_distill_ref`), forward + backward, each in its own process.

    python bench/distill_memory.py                     # N=8192 tokens, V=49152, student d 256, teacher d 512
    python bench/distill_memory.py --n 2048 --json out.json
"Extra" = the process's peak memory during forward + backward minus its peak once the inputs exist: on a GPU
torch.cuda.max_memory_allocated, on a CPU the resident-set high-water mark (VmHWM; large tensors are
mmap'd and returned, so the mark is the true peak). The last stdout line is one JSON document.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402

from bench.common import finish_report, peak_rss_bytes, run_worker  # noqa: E402
from kernels.common import run_cli  # noqa: E402


def measure(impl: str, n: int, v: int, d: int, dt: int, device: str) -> dict:
    import time

    import torch

    from kernels.fused_linear_distill import fused_linear_distill, fused_linear_distill_ref
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, d, device=dev, generator=g).requires_grad_()
    w = (torch.randn(v, d, device=dev, generator=g) * 0.02).requires_grad_()
    ht = torch.randn(n, dt, device=dev, generator=g)
    wt = torch.randn(v, dt, device=dev, generator=g) * 0.02
    y = torch.randint(0, v, (n,), device=dev, generator=g)

    def peak():
        if dev.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(dev)
        return peak_rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base = peak()
    t0 = time.perf_counter()
    fn = fused_linear_distill if impl == "chunked" else fused_linear_distill_ref
    loss = fn(h, w, ht, wt, y, 0.5, 2.0)
    loss.backward()
    extra = peak() - base
    return {"impl": impl, "loss": loss.item(), "peak_extra_bytes": extra, "peak_extra_gib": round(extra / 2**30, 3),
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192, help="target tokens in the measured batch; default: 8192")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size (logits per token); default: 49152")
    p.add_argument("--d", type=int, default=256, help="student hidden size (features); default: 256")
    p.add_argument("--d-teacher", type=int, default=512, help="teacher hidden size (features); default: 512")
    p.add_argument("--device", default="cpu", help="torch device to measure on (cpu, cuda); default: cpu")
    p.add_argument("--impls", default="chunked,materialised",
                   help="comma-separated loss implementations to compare; default: chunked,materialised")
    p.add_argument("--json", help="also write the report (JSON) to this file; default: none")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one impl in this process
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.one, a.n, a.vocab, a.d, a.d_teacher, a.device)))
        return 0
    from train.metrics import run_record
    rows = []
    for impl in a.impls.split(","):
        row, why = run_worker([__file__, "--one", impl, "--n", str(a.n), "--vocab", str(a.vocab), "--d", str(a.d),
                               "--d-teacher", str(a.d_teacher), "--device", a.device], impl)
        rows.append(row or {"impl": impl, "error": why})
    nv = a.n * a.vocab * 4
    for r in rows:
        print(f"{r['impl']:>13}: " + (f"peak extra {r['peak_extra_gib']:.3f} GiB "
              f"({r['peak_extra_bytes'] / nv:.2f} x one N x V fp32 tensor), {r['seconds']} s, loss {r['loss']:.6f}"
              if "error" not in r else f"error: {r['error']}"), file=sys.stderr)
    finish_report({"bench": "distill_memory", **run_record(a.device), "n": a.n, "vocab": a.vocab, "d": a.d,
                   "d_teacher": a.d_teacher, "dtype": "fp32", "one_nxv_fp32_gib": round(nv / 2**30, 3),
                   "rows": rows}, a.json)
    return 0

if __name__ == "__main__":
    run_cli(main)
