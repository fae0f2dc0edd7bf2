"""The first ten minutes on a GPU: one command that runs the CUDA kernel tests, the kernel benchmark, the
end-to-end throughput rows, a BF16-vs-FP8 pretraining comparison and decode speed, each stage in its own
process with its own time budget, and writes DIR/gpu_check.json and DIR/gpu_check.md (device, driver,
versions, commit, every stage's result, elapsed time and log). A stage whose package or device is missing is
skipped with a one-line reason; a failing stage never stops the others.

    python bench/gpu_check.py --out bench/results/$(date -u +%Y-%m-%dT%H%MZ)_h100_gpu_check
    python bench/gpu_check.py --out /tmp/gc --dry-run      # the same control flow on CPU, tiny shapes, < 1 min
    python bench/gpu_check.py --wheels                     # the pip commands for an offline GPU machine
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from kernels.common import FurnaceError, run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# Beyond a CUDA PyTorch image (torch, triton, numpy): download on a machine with network, carry the folder over.
WHEELS = ("pip download -d furnace-wheels --only-binary=:all: --python-version 3.12 "
          "--platform manylinux_2_28_x86_64 tokenizers tiktoken safetensors tqdm ninja pytest\n"
          "pip download -d furnace-wheels --no-deps --only-binary=:all: --python-version 3.12 "
          "--platform manylinux_2_28_x86_64 torchao==0.18.0 liger-kernel\n"
          "# on the GPU machine, in the repository:\n"
          "pip install --no-index --find-links furnace-wheels tokenizers tiktoken safetensors tqdm ninja pytest\n"
          "pip install --no-index --find-links furnace-wheels --no-deps torchao liger-kernel\n"
          "pip install --no-deps --no-build-isolation -e .")
LOSS_TOL = 0.03        # FP8's mean loss over the last 10% of steps within 3% of BF16's
LOSS_FALL = 0.8        # and each run's last-10% mean below 0.8 x its first step's loss (--dry-run: below it)


def _sh(cmd: list, budget: float, log: Path, env: dict | None = None) -> dict:
    """Run one stage command with a time budget; stdout+stderr go to `log`. Returns rc, elapsed, out."""
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=budget, env={**os.environ, **(env or {})})
            rc, out = p.returncode, p.stdout
        except subprocess.TimeoutExpired as e:          # its output so far (bytes, even with text=True)
            rc, out = None, e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        f.write(out)
    return dict(rc=rc, elapsed_s=round(time.time() - t0, 1), out=out, log=log.name)


def _last_json(out: str):
    for ln in reversed(out.strip().splitlines()):
        if ln.startswith("{"):
            try:
                return json.loads(ln)
            except json.JSONDecodeError:
                return None
    return None


def _status(r: dict, what: str) -> dict:
    """ok / failed / timeout from a finished command, with a one-line reason."""
    if r["rc"] is None:
        return dict(status="timeout", reason=f"{what} ran past its budget; see {r['log']}")
    if r["rc"]:
        tail = [ln for ln in r["out"].strip().splitlines() if ln.strip()][-1:] or [""]
        return dict(status="failed", reason=f"{what} exited {r['rc']}: {tail[0][:300]}")
    return dict(status="ok", reason=None)


# ----------------------------------------------------------------------------- stages
def stage_kernel_tests(ctx):
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernel_*.py"))
    if ctx["dry"]:   # the interpreter copies of one op, to exercise the parsing
        cmd = [PY, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "tests/test_kernel_swiglu.py", "-k", "cpu"]
    else:
        cmd = [PY, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *files, "-k", "cuda"]
    r = _sh(cmd, ctx["budget"], ctx["dir"] / "kernel_tests.log")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", r["out"])}
    failures = [ln for ln in r["out"].splitlines() if ln.startswith(("FAILED", "ERROR"))]
    st = _status(r, "pytest")
    if r["rc"] == 1 and failures:
        st["reason"] = f"{len(failures)} kernel test(s) failed: {failures[0][:300]}"
    return dict(st, elapsed_s=r["elapsed_s"], log=r["log"], counts=counts, failures=failures)


def stage_kernel_bench(ctx):
    args = ["--memory-only", "--memory-shape", "256,64,1024"] if ctx["dry"] else ["--presets", "112m,1b"]
    r = _sh([PY, "bench/kernel_bench.py", *args], ctx["budget"], ctx["dir"] / "kernel_bench.log")
    return dict(_status(r, "bench/kernel_bench.py"), elapsed_s=r["elapsed_s"], log=r["log"], report=_last_json(r["out"]))


def _throughput(preset):
    def stage(ctx):
        out = ctx["dir"] / f"throughput_{preset}.json"
        if ctx["dry"] and preset != "112m":
            return dict(status="skipped", reason="--dry-run runs bench/throughput.py once (the 112m stage, on tiny)",
                        elapsed_s=0, rows=[])
        if ctx["dry"]:
            args = ["--preset", "tiny", "--variants", "eager", "--precisions", "bf16", "--batch-size", "1",
                    "--seq-len", "32", "--steps", "2", "--warmup", "1", "--device", "cpu"]
        else:
            args = ["--preset", preset, "--device", "cuda"]
        r = _sh([PY, "bench/throughput.py", *args, "--json", str(out)], ctx["budget"],
                ctx["dir"] / f"throughput_{preset}.log")
        rep = _last_json(r["out"])
        rows = [{k: row.get(k) for k in ("variant", "precision", "status", "reason", "tokens_per_s", "mfu",
                                         "peak_mem_bytes")} for row in (rep or {}).get("results", [])]
        return dict(_status(r, "bench/throughput.py"), elapsed_s=r["elapsed_s"], log=r["log"], rows=rows)
    return stage


def _losses(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r["loss"] for r in rows if "loss" in r and "step" in r]


def stage_pretrain(ctx):
    """BF16 and FP8 pretraining of 112m for 200 steps on the embedded corpus; the curves must agree."""
    d = ctx["dir"]
    if not (importlib.util.find_spec("torchao") or importlib.util.find_spec("transformer_engine")):
        return dict(status="skipped", reason="no FP8 backend: neither torchao nor transformer-engine is installed "
                    "(see --wheels)", elapsed_s=0)
    if ctx["dry"]:
        data = d / "data"
        prep = _sh([PY, "data/prepare.py", "--out", str(data), "--source", "kernels", "--tokenizer", "train:512"],
                   ctx["budget"] / 3, d / "pretrain_data.log")
        if prep["rc"] != 0:
            return dict(_status(prep, "data/prepare.py"), elapsed_s=prep["elapsed_s"], log=prep["log"])
        common = ["--preset", "tiny", "--data", str(data), "--max-steps", "6", "--batch-size", "1", "--seq-len",
                  "64", "--device", "cpu", "--dtype", "bf16", "--eval-tokens", "128", "--lr", "3e-3"]
    else:
        common = ["--preset", "112m", "--max-steps", "200", "--device", "cuda", "--dtype", "bf16", "--eval-tokens", "65536"]
    fall = 1.0 if ctx["dry"] else LOSS_FALL
    t0, curves, runs = time.time(), {}, {}
    for name, extra in (("bf16", []), ("fp8", ["--fp8", "--fp8-strict"])):
        left = ctx["budget"] - (time.time() - t0)
        r = _sh([PY, "train/pretrain.py", *common, *extra, "--out", str(d / f"pretrain_{name}")], max(1.0, left),
                d / f"pretrain_{name}.log")
        runs[name] = dict(_status(r, f"train/pretrain.py ({name})"), log=r["log"])
        curves[name] = _losses(d / f"pretrain_{name}")
    res = dict(elapsed_s=round(time.time() - t0, 1), runs=runs, losses=curves, tolerance=dict(
        agree_rel=LOSS_TOL, fall_ratio=fall, note="means over the last 10% of steps; fall: vs the first step"))
    bad = [f"{n}: {v['reason']}" for n, v in runs.items() if v["status"] != "ok"]
    if bad:
        return dict(res, status="failed", reason="; ".join(bad))
    tail = {n: sum(c[-max(1, len(c) // 10):]) / max(1, len(c[-max(1, len(c) // 10):])) for n, c in curves.items() if c}
    if len(tail) < 2:
        return dict(res, status="failed", reason="no loss curve in metrics.jsonl")
    res["tail_mean"] = tail
    rel = abs(tail["fp8"] - tail["bf16"]) / tail["bf16"]
    falls = {n: tail[n] < fall * curves[n][0] for n in curves}
    res["rel_diff"] = round(rel, 4)
    if rel > LOSS_TOL or not all(falls.values()):
        return dict(res, status="failed", reason=f"FP8 vs BF16 final loss differ by {rel:.1%} (limit {LOSS_TOL:.0%}) "
                    f"or a loss did not fall below {fall} x its first value: {falls}")
    return dict(res, status="ok", reason=None)


def stage_decode(ctx):
    """CUDA decode tokens/s of 112m through bench/generate.py, when it can run on a GPU."""
    probe = _sh([PY, "bench/generate.py", "--help"], 60, ctx["dir"] / "decode.log")
    if "--device" not in probe["out"]:
        return dict(status="skipped", reason="bench/generate.py has no --device flag (it measures CPU generation only)",
                    elapsed_s=probe["elapsed_s"], log=probe["log"])
    args = ["--presets", "tiny" if ctx["dry"] else "112m", "--device", "cpu" if ctx["dry"] else "cuda",
            "--hf-dtypes", "", "--new-tokens", "8" if ctx["dry"] else "128"]
    r = _sh([PY, "bench/generate.py", *args], ctx["budget"], ctx["dir"] / "decode.log")
    return dict(_status(r, "bench/generate.py"), elapsed_s=r["elapsed_s"], log=r["log"], report=_last_json(r["out"]))


# (name, budget in seconds on a GPU, modules it needs, function); the budgets add up to 460 s, under 8 minutes
STAGES = [("kernel_tests", 80, ["pytest"], stage_kernel_tests),
          ("kernel_bench", 60, [], stage_kernel_bench),
          ("throughput_112m", 90, [], _throughput("112m")),
          ("throughput_0.5b", 60, [], _throughput("0.5b")),
          ("pretrain_bf16_vs_fp8", 140, [], stage_pretrain),
          ("decode_112m", 30, [], stage_decode)]
DRY_BUDGET = 240    # per stage in --dry-run: generous, for a busy CI machine (about 1 CPU-minute in all)


def environment(dry: bool) -> dict:
    import torch  # noqa: PLC0415

    from train.metrics import run_record  # noqa: PLC0415

    env = dict(**run_record("cuda" if torch.cuda.is_available() else "cpu"), dry_run=dry, cuda=torch.version.cuda,
               driver=None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["device"] = f"{p.name} (cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory >> 20} MiB)"
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            env["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = None
    return env


def markdown(rep: dict) -> str:
    e = rep["environment"]
    lines = [f"# GPU check {e['date_utc']}{' (dry run: CPU, tiny shapes, interpreter)' if e['dry_run'] else ''}", "",
             f"- device: {e['device']}; driver {e['driver']}; CUDA {e['cuda']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in e["versions"].items() if v),
             f"- commit: {e['git_commit']}{' (uncommitted changes)' if e['git_dirty'] else ''}",
             f"- total: {rep['elapsed_s']} s", "", "| stage | status | s | budget s | detail |", "|---|---|---|---|---|"]
    for s in rep["stages"]:
        detail = s.get("reason") or ""
        if s["name"] == "kernel_tests" and s.get("counts"):
            detail = ", ".join(f"{v} {k}" for k, v in s["counts"].items()) + (f"; {detail}" if detail else "")
        if s["name"] == "pretrain_bf16_vs_fp8" and s.get("tail_mean"):
            detail = (f"final loss bf16 {s['tail_mean']['bf16']:.4f}, fp8 {s['tail_mean']['fp8']:.4f} "
                      f"({s['rel_diff']:.2%}; limit {LOSS_TOL:.0%})") + (f"; {detail}" if detail else "")
        lines.append(f"| {s['name']} | {s['status']} | {s.get('elapsed_s', 0)} | {s['budget_s']} | {detail} |")
        for row in s.get("rows", []):
            if row["status"] == "ok":
                mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") else ""
                lines.append(f"| &nbsp; {row['variant']} {row['precision']} | ok | | | {row['tokens_per_s']:,.0f} tok/s{mfu} |")
    lines += ["", "Logs and the JSON of each stage are in this folder; `gpu_check.json` holds every number.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for gpu_check.json, gpu_check.md and the stage logs (created; must be empty); required unless --wheels")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton's interpreter: the control flow only; default: off")
    p.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(s[0] for s in STAGES)}; default: all")
    p.add_argument("--wheels", action="store_true", help="print the pip commands for an offline install and exit; default: off")
    args = p.parse_args(argv)
    if args.wheels:
        print(WHEELS)
        return 0
    if not args.out:
        raise FurnaceError("--out DIR is required (e.g. bench/results/<date>_<gpu>_gpu_check)")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FurnaceError(f"--out {out}: exists and is not an empty folder; choose a new one (nothing was written)")
    names = [s[0] for s in STAGES]
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()] or names
    bad = [s for s in chosen if s not in names]
    if bad:
        raise FurnaceError(f"--stages {','.join(bad)}: unknown; expected a subset of {','.join(names)}")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.dry_run)
    os.environ.pop("TRITON_INTERPRET", None)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"          # the kernel tests' interpreter copies
    t0, results = time.time(), []
    import torch  # noqa: PLC0415

    for name, budget, needs, fn in STAGES:
        if name not in chosen:
            continue
        budget = DRY_BUDGET if args.dry_run else budget
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        print(f"[gpu_check] {name} (budget {budget} s) ...", flush=True)
        if missing:
            r = dict(status="skipped", reason=f"{', '.join(missing)} not installed (see --wheels)", elapsed_s=0)
        elif not args.dry_run and not torch.cuda.is_available():
            r = dict(status="skipped", reason="no CUDA device (use --dry-run to check the control flow on CPU)",
                     elapsed_s=0)
        else:
            r = fn(dict(dir=out, budget=budget, dry=args.dry_run))
        results.append(dict(name=name, budget_s=budget, **r))
        print(f"[gpu_check] {name}: {r['status']} in {r.get('elapsed_s', 0)} s"
              + (f" ({r['reason']})" if r.get("reason") else ""), flush=True)
    rep = dict(environment=env, elapsed_s=round(time.time() - t0, 1), stages=results, wheels=WHEELS)
    from model.fileio import atomic_write_json  # the one atomic write
    atomic_write_json(out / "gpu_check.json", rep, indent=1, default=str)
    (out / "gpu_check.md").write_text(markdown(rep))
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {rep['elapsed_s']} s")
    print(json.dumps(dict(out=str(out), elapsed_s=rep["elapsed_s"],
                          stages={s["name"]: s["status"] for s in results})))
    return 0 if all(s["status"] in ("ok", "skipped") for s in results) else 1


if __name__ == "__main__":
    run_cli(main)
