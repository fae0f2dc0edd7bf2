"""Per-step metrics: console line, OUT/metrics.jsonl (one JSON object per line), wandb, loss plot, and the
run record (commit, versions, device) that training runs and benchmarks both write."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

import torch

from model.fileio import disk_full_guard

log = logging.getLogger("furnace")
REPO = Path(__file__).resolve().parents[1]


class StepTimer:
    """Wall time of the training step only, with device synchronisation (eval and checkpoints excluded)."""

    def __init__(self, device: torch.device):
        self.device = device

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        return time.perf_counter() - self.t0


class MetricsLog:
    """Rank 0 only. Appends to OUT/metrics.jsonl; mirrors to wandb when enabled."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_run=None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = wandb_run
        self._f = open(self.path, "a") if enabled else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        rec = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items() if v is not None}
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


def init_wandb(opts, run_dir: Path, run_id: str | None, config: dict):
    """Start or resume (same id) a wandb run; honours WANDB_MODE=offline. Returns (run, id)."""
    try:
        import wandb
    except ImportError:
        from kernels.common import FurnaceError  # noqa: PLC0415
        raise FurnaceError("--wandb needs the wandb package: pip install wandb (or pip install -e '.[log]')") from None
    run = wandb.init(project=opts.wandb_project, id=run_id, resume="allow", dir=str(run_dir),
                     config=config, name=run_dir.name)
    return run, run.id


def plot_losses(run_dir: Path, key: str = "loss", val_key: str = "val_loss", name: str = "loss.png") -> Path | None:
    """OUT/loss.png from metrics.jsonl when matplotlib is present (other keys: GRPO's OUT/reward.png)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("loss plot skipped: matplotlib not installed")
        return None
    steps, losses, vsteps, vlosses = [], [], [], []
    for ln in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(ln)
        if key in r:
            steps.append(r["step"]); losses.append(r[key])
        if val_key in r:
            vsteps.append(r["step"]); vlosses.append(r[val_key])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="train", lw=1)
    if vsteps:
        ax.plot(vsteps, vlosses, "o-", label="val")
    ax.set_xlabel("step"); ax.set_ylabel(key); ax.legend(); ax.grid(alpha=0.3)
    out = run_dir / name
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def versions() -> dict:
    """Installed versions of the libraries that decide speed and numerics (no imports needed)."""
    from importlib.metadata import PackageNotFoundError, version
    v = {"python": os.sys.version.split()[0], "torch": torch.__version__}
    for pkg in ("triton", "transformer-engine", "torchao", "liger-kernel", "flash-attn", "numpy", "tokenizers"):
        try:
            v[pkg] = version(pkg)
        except PackageNotFoundError:
            v[pkg] = None
    return v


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        from model.flops import device_peak_name  # noqa: PLC0415
        name = torch.cuda.get_device_name(device)
        cc = torch.cuda.get_device_capability(device)
        return f"{name} (cc {cc[0]}.{cc[1]}, peak row: {device_peak_name(name)})"
    return f"cpu ({os.cpu_count()} logical cores, {torch.get_num_threads()} threads)"


def run_record(device: torch.device) -> dict:
    """Where a number or a checkpoint came from: device, library versions, git commit."""
    return {"device": device_description(device), "versions": versions(), "git_commit": git_commit()}
