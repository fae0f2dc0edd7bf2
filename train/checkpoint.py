"""Training checkpoints: atomic, keep-last-K, everything needed for an exact resume.

RUN/checkpoints/step_XXXXXXXX/
    config.json, model.safetensors   plain weights (model.io.save): load anywhere, no TE/compile/DDP keys
    tokenizer.json                   the data's tokenizer
    trainer_state.pt                 optimizer, step, loader state, RNG states, counters, wandb run id
    ema.safetensors                  EMA weights (with --ema)
A checkpoint is written to RUN/checkpoints/.tmp-step_X and renamed when complete, so a crash (even
SIGKILL) never leaves a folder that looks complete.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from kernels.common import FurnaceError
from model.io import checkpoint_step, latest_checkpoint, save as save_model, umask_mode

log = logging.getLogger("furnace")
STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict, tokenizer_dir: Path | None,
                    keep_last: int, ema: dict | None = None, weights_only_older: bool = False) -> Path:
    """Write step `step` atomically, then drop all but the newest `keep_last` checkpoints.
    `weights_only_older` (--keep-weights-only): the kept checkpoints other than the newest lose their trainer
    state and EMA (about two thirds of their size) and keep their weights: loadable, no longer resumable."""
    ck_root = run_dir / "checkpoints"
    ck_root.mkdir(parents=True, exist_ok=True)
    final = ck_root / f"step_{step:08d}"
    tmp = ck_root / f".tmp-step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_meta.json", "chat_template.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)  # new file: the umask's mode, not the source's
    torch.save(state, tmp / STATE_FILE)
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        umask_mode(tmp / "ema.safetensors")
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    done = sorted((p for p in ck_root.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                  key=checkpoint_step)
    for old in done[:-keep_last]:
        shutil.rmtree(old)
    if weights_only_older:
        for old in done[-keep_last:-1]:
            for name in (STATE_FILE, "ema.safetensors"):
                (old / name).unlink(missing_ok=True)
    return final


def load_trainer_state(ckpt: Path) -> dict:
    f = ckpt / STATE_FILE
    if not f.is_file():
        raise FurnaceError(f"--resume: {ckpt} has no {STATE_FILE} (a weights-only checkpoint? use --init)")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign pickle
        raise FurnaceError(f"--resume: {f} is unreadable ({type(e).__name__}: {e})") from None


def run_config_path(run_dir: Path) -> Path:
    return run_dir / "config.json"


def check_out_dir(run_dir: Path, opts_dict: dict, resume: bool, run_defining: tuple[str, ...]) -> Path | None:
    """Refuse an OUT holding a different run unless --resume; returns the checkpoint to resume from."""
    cfg_file = run_config_path(run_dir)
    has_run = cfg_file.is_file() or (run_dir / "checkpoints").is_dir()
    if not resume:
        if has_run:
            raise FurnaceError(f"--out {run_dir} already holds a training run; pass --resume to continue it, "
                               f"or choose another --out (nothing was changed)")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FurnaceError(f"--out {run_dir} exists and is not empty; choose another --out")
        return None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FurnaceError(f"--resume: {run_dir} holds no complete checkpoint to resume from")
    if cfg_file.is_file():
        old = json.loads(cfg_file.read_text()).get("train", {})
        diffs = [f"{k}: {old.get(k)!r} -> {opts_dict.get(k)!r}" for k in run_defining
                 if k in old and old.get(k) != opts_dict.get(k)]
        if diffs:
            raise FurnaceError(f"--resume {run_dir}: options differ from the saved run ({'; '.join(diffs)}); "
                               f"resume with the same options or start a new --out")
    return ckpt


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint (the killed run's tail), atomically."""
    if not path.is_file():
        return
    kept = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln).get("step", 0) <= step:
                kept.append(ln)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    tmp.replace(path)
