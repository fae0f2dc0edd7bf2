"""bench/throughput.py's driver and report: run every (variant, precision) row in a worker process, add the
speed-ups over eager BF16, and render the console table, the JSON document and the bar chart."""
from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from bench._throughput_rows import GRAD_CLIP, LR, WEIGHT_DECAY, precheck
from model.config import get_preset
from kernels.common import FurnaceError
from model.fileio import atomic_path, atomic_write_json
from model.flops import PEAK_TFLOPS, device_peak_name, flops_per_token, matmul_params
from model.gpt import GPT
from train.metrics import run_record

log = logging.getLogger("furnace")
ROOT = Path(__file__).resolve().parents[1]
ROW_TIMEOUT_S = 1800
# Every row carries these keys; rows that did not run keep them null (no made-up numbers).
NUMBERS = ("tokens_per_s", "tokens_per_s_wall", "step_ms_median", "step_ms_min", "step_ms_max", "step_ms_stdev",
           "spread_pct", "mfu", "mfu_fp8_peak", "peak_mem_bytes", "speedup_vs_eager_bf16")


def parse_list(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise FurnaceError(f"{flag} {text!r}: expected a comma-separated list of {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def run_rows(specs: list[dict], worker_cmd: list[str]) -> list[dict]:
    """Each spec -> a row: 'unavailable' straight away when precheck says so, else measured by a worker."""
    rows = []
    for spec in specs:
        label = f"{spec['variant']}/{spec['precision']}"
        why = precheck(spec["variant"], spec["precision"], torch.device(spec["device"]))
        if why:
            log.info(f"bench {label}: unavailable ({why})")
            row = {"variant": spec["variant"], "precision": spec["precision"], "status": "unavailable", "reason": why}
        else:
            log.info(f"bench {label}: running {spec['warmup']} warm-up + {spec['steps']} timed steps ...")
            row = _run_worker(spec, worker_cmd, label)
            log.info(f"bench {label}: {row['status']}"
                     + (f" {row['tokens_per_s']:.0f} tok/s" if row["status"] == "ok" else f" ({row['reason']})"))
        for k in NUMBERS:
            row.setdefault(k, None)
        rows.append(row)
    return rows


def _run_worker(spec: dict, worker_cmd: list[str], label: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled Triton on GPU
    err = {"variant": spec["variant"], "precision": spec["precision"], "status": "error"}
    try:
        out = subprocess.run(worker_cmd + [json.dumps(spec)], capture_output=True, text=True, env=env,
                             timeout=ROW_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {**err, "reason": f"did not finish within {ROW_TIMEOUT_S} s"}
    for line in out.stderr.splitlines():
        print(f"  [{label}] {line}", file=sys.stderr)
    lines = out.stdout.strip().splitlines()
    if out.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = [ln for ln in out.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return {**err, "reason": f"worker exited with code {out.returncode}: {tail[0][:300]}"}


def add_speedups(rows: list[dict]) -> None:
    base = next((r for r in rows if r["variant"] == "eager" and r["precision"] == "bf16" and r["status"] == "ok"),
                None)
    for r in rows:
        if r["status"] == "ok" and base is not None:
            r["speedup_vs_eager_bf16"] = r["tokens_per_s"] / base["tokens_per_s"]


def conditions(device: torch.device) -> dict:
    """What else was true while measuring: date, CPU, load (other processes slow CPU rows), dirty tree."""
    cpu = platform.processor() or ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        dirty = None
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1m_start": os.getloadavg()[0], "git_tree_dirty": dirty,
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")},
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def config_block(preset: str, batch_size: int, seq_len: int, warmup: int, steps: int,
                 device: torch.device) -> dict:
    cfg = get_preset(preset)
    with torch.device("meta"):                      # parameter count without allocating the model
        n_params = GPT(cfg).num_params()
    peak_row = device_peak_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    bf16, fp8 = PEAK_TFLOPS[peak_row] if peak_row else (None, None)
    return {"preset": preset, "model": cfg.to_dict(), "num_params": n_params, "matmul_params": matmul_params(cfg),
            "batch_size": batch_size, "seq_len": seq_len, "tokens_per_step": batch_size * seq_len,
            "warmup_steps": warmup, "timed_steps": steps,
            "flops_per_token": flops_per_token(cfg, seq_len), "flop_formula": "6*N + 12*L*d*T (model/flops.py)",
            "peak_row": peak_row, "peak_tflops_bf16": bf16, "peak_tflops_fp8": fp8,
            "step": (f"train.trainer.Trainer.train_step: forward (fused linear+CE loss) + backward + grad clip "
                     f"{GRAD_CLIP} + AdamW (lr {LR}, wd {WEIGHT_DECAY}, train.optim.build_optimizer) on random tokens"),
            "timing": ("CUDA events around each step" if device.type == "cuda" else
                       "time.perf_counter around each step (CPU ops are synchronous)")
            + "; warm-up steps excluded; tokens_per_s = tokens_per_step / median step time"}


def format_table(report: dict) -> str:
    head = ("variant", "precision", "status", "tok/s", "spread", "step ms", "MFU(bf16pk)", "MFU(fp8pk)",
            "peak mem", "vs eager-bf16")
    body = []
    for r in report["results"]:
        ok = r["status"] == "ok"

        def f(key, fmt):
            return fmt(r[key]) if ok and r.get(key) is not None else "-"
        body.append((r["variant"], r["precision"], r["status"], f("tokens_per_s", lambda v: f"{v:,.0f}"),
                     f("spread_pct", lambda v: f"{v:.0f}%"), f("step_ms_median", lambda v: f"{v:.1f}"),
                     f("mfu", lambda v: f"{100 * v:.1f}%"), f("mfu_fp8_peak", lambda v: f"{100 * v:.1f}%"),
                     f("peak_mem_bytes", lambda v: f"{v / 2**20:,.0f} MiB"),
                     f("speedup_vs_eager_bf16", lambda v: f"{v:.2f}x")))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    cfg = report["config"]
    out = [f"device: {report['device']}   preset {cfg['preset']}, batch {cfg['batch_size']} x seq "
           f"{cfg['seq_len']}, {cfg['warmup_steps']} warm-up + {cfg['timed_steps']} timed steps",
           line(head), line(["-" * w for w in widths]), *map(line, body)]
    notes = [f"  {r['variant']}/{r['precision']}: {r['reason']}" for r in report["results"] if r["status"] != "ok"]
    notes += [f"  {r['variant']}/{r['precision']} ran as: {r['ran_as']}" for r in report["results"] if r.get("ran_as")]
    ok = [r for r in report["results"] if r["status"] == "ok"]
    if ok and ok[0].get("mfu_note"):
        notes.append(f"  MFU: {ok[0]['mfu_note']}")
    if ok and ok[0].get("peak_mem_kind"):
        notes.append(f"  peak mem: {ok[0]['peak_mem_kind']}")
    notes.append("  spread = (slowest - fastest timed step) / median step")
    return "\n".join(out + ["notes:"] + notes)


def check_out_path(path: str | None, flag: str) -> Path | None:
    """Fail before measuring, not after, when an output path cannot be written."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.parent.is_dir():
        raise FurnaceError(f"{flag} {path}: folder {p.parent} does not exist; create it or pick another path")
    if p.is_dir():
        raise FurnaceError(f"{flag} {path} is a folder; give a file path")
    if flag == "--plot" and importlib.util.find_spec("matplotlib") is None:
        raise FurnaceError("--plot needs matplotlib, which is not installed: pip install matplotlib")
    return p


def write_json(path: Path, report: dict) -> None:
    atomic_write_json(path, report)


def write_plot(path: Path, report: dict) -> None:
    """Grouped bars: tokens/s per variant (median step; whiskers: slowest and fastest step), one bar per
    precision; rows that did not run are marked n/a."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = report["results"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    width = 0.8 / len(precisions)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(variants), 4))
    for j, prec in enumerate(precisions):
        for i, var in enumerate(variants):
            r = next((r for r in rows if r["variant"] == var and r["precision"] == prec), None)
            x = i + (j - (len(precisions) - 1) / 2) * width
            if r is not None and r["status"] == "ok":
                n = r["tokens_per_step"]
                lo, hi = n / (r["step_ms_max"] / 1e3), n / (r["step_ms_min"] / 1e3)   # slowest, fastest step
                ax.bar(x, r["tokens_per_s"], width, color=f"C{j}", label=prec if i == 0 else None,
                       yerr=[[r["tokens_per_s"] - lo], [hi - r["tokens_per_s"]]], capsize=2)
            else:
                ax.bar(x, 0, width, color=f"C{j}", label=prec if i == 0 else None)
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(variants)), variants)
    ax.set_ylabel("tokens/s (median step; whiskers: slowest/fastest)")
    cfg = report["config"]
    ax.set_title(f"{cfg['preset']} B={cfg['batch_size']} T={cfg['seq_len']} on {report['device'][:60]}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def build_report(device: torch.device, config: dict, rows: list[dict], cond: dict) -> dict:
    add_speedups(rows)
    cond["load_avg_1m_end"] = os.getloadavg()[0]
    return {**run_record(device), "config": config, "conditions": cond, "results": rows}
