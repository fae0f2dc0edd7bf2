"""Per-step metrics: console line, OUT/metrics.jsonl (one JSON object per line), wandb, loss plot, and the
run record (commit, versions, device) that training runs and benchmarks both write."""
from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
from pathlib import Path

import torch

from model.fileio import disk_full_guard

log = logging.getLogger("furnace")
REPO = Path(__file__).resolve().parents[1]


class MetricsLog:
    """Rank 0 only. Appends to OUT/metrics.jsonl; mirrors to wandb when enabled."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_run=None):
        self.path, self.wandb = run_dir / "metrics.jsonl", wandb_run
        self._f = open(self.path, "a") if enabled else None
        self.last: dict = {}  # the last training-step record (for the summary)

    def write(self, record: dict) -> None:
        if self._f is None:
            return
        rec = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items() if v is not None}
        if "loss" in rec:
            self.last = rec
        with disk_full_guard(self.path):
            self._f.write(json.dumps(rec) + "\n")
            self._f.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rec.items() if k != "step"}, step=rec.get("step"))

    def close(self):
        if self._f:
            self._f.close()


def format_step(rec: dict, extra: tuple[str, ...] = (), unit: str = "tok") -> str:
    """One console line; `extra` names further float fields of `rec` to show (a task's own metrics)."""
    parts = [f"step {rec['step']}", f"loss {rec['loss']:.4f}", *(f"{k} {rec[k]:.4f}" for k in extra if k in rec),
             f"lr {rec['lr']:.2e}"]
    if rec.get("grad_norm") is not None:
        parts.append(f"gnorm {rec['grad_norm']:.2f}")
    parts.append(f"{rec['tokens_per_s']:,.1f} {unit}/s" if rec["tokens_per_s"] < 100 else
                 f"{rec['tokens_per_s']:,.0f} {unit}/s")
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    if rec.get("peak_mem_gb") is not None:
        parts.append(f"mem {rec['peak_mem_gb']:.2f} GB")
    return " | ".join(parts)


# The panels of OUT/loss.png: (title, [(metrics.jsonl key, label, drawn with markers: an evaluation)]).
# A panel is drawn when any of its keys was logged (DPO's reward panels, for instance).
PANELS = (("loss", [("loss", "train", False), ("val_loss", "val", True)]),
          ("reward accuracy (DPO)", [("reward_acc", "train", False), ("val_reward_acc", "val", True)]),
          ("reward margin (DPO)", [("reward_margin", "train", False), ("val_reward_margin", "val", True)]),
          ("learning rate", [("lr", "lr", False)]),
          ("throughput", [("tokens_per_s", "units/s", False)]))


def plot_losses(run_dir: Path, panels=PANELS, name: str = "loss.png") -> Path | None:
    """OUT/<name> from metrics.jsonl, when matplotlib is present: one panel per entry of `panels` with a logged
    key, against the step (GRPO passes its reward panels for OUT/reward.png)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("loss plot skipped: matplotlib not installed (pip install matplotlib)")
        return None
    series: dict[str, list[tuple]] = {}  # key -> [(step, value)]
    for ln in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(ln)
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                series.setdefault(k, []).append((r["step"], v))
    panels = [(t, logged) for t, curves in panels if (logged := [c for c in curves if c[0] in series])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, curves) in zip(axes[:, 0], panels):
        for key, label, markers in curves:
            ax.plot(*zip(*series[key]), "o-" if markers else "-", label=label, lw=1, ms=3)
        ax.set_title(title, fontsize=9, loc="left"); ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    out = run_dir / name
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h14m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def summary_lines(s: dict) -> list[str]:
    """The end of a run for a person: what was done, how fast, the losses, where everything is."""
    unit = {"tok": "tokens", "pair": "pairs"}.get(s.get("unit", "tok"), s.get("unit"))
    rate = f", {s['tokens_per_s']:,.0f} {unit}/s" if s.get("tokens_per_s") else ""
    head = "interrupted" if s.get("interrupted") else "done"
    lines = [f"{head}: {s['steps']} steps, {s['tokens']:,} {unit} in {format_duration(s.get('seconds', 0))}{rate}"
             + (f"; {s['skipped_steps']} non-finite steps skipped" if s.get("skipped_steps") else "")]
    losses = [f"{k.replace('_', ' ')} {s[k]:.4f}" for k in ("final_loss", "val_loss", "val_reward_acc", "val_reward_margin")
              if isinstance(s.get(k), float)]
    if losses:
        lines.append("  " + ", ".join(losses).replace("final loss", "train loss (last step)"))
    if s.get("checkpoint"):
        lines.append(f"  checkpoint: {s['checkpoint']}")
    if s.get("plot"):
        dpo = ", reward accuracy and margin" if "val_reward_acc" in s else ""
        lines.append(f"  plots: {s['plot']} (loss{dpo}, learning rate, throughput)")
    lines.append(f"  record: {s.get('record')} (this summary), metrics.jsonl (every step)")
    return lines


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_record(device: torch.device | str = "cpu", extra_versions: tuple[str, ...] = ()) -> dict:
    """Where a number or a checkpoint came from: device, CPU, library versions, git commit and whether the tree
    had uncommitted changes, the date, and the load average (other processes slow CPU timings). Versions come
    from package metadata: nothing is imported (importing triton maps a ~650 MB library into the process and
    would count in a bench's RSS)."""
    from importlib.metadata import PackageNotFoundError, version
    device = torch.device(device)
    if device.type == "cuda":
        from model.flops import device_peak_name  # noqa: PLC0415
        name, cc = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        desc = f"{name} (cc {cc[0]}.{cc[1]}, peak row: {device_peak_name(name)})"
    else:
        desc = f"cpu ({os.cpu_count()} logical cores, {torch.get_num_threads()} threads)"
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "transformer-engine", "torchao", "liger-kernel", "flash-attn", "numpy", "tokenizers",
                *extra_versions):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"device": desc, "cpu": cpu, "versions": versions, "git_commit": _git("rev-parse", "HEAD") or None,
            "git_dirty": None if status is None else bool(status),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "load_avg_1m": os.getloadavg()[0]}
