"""Training checkpoints: atomic, checksummed, keep-last-K, everything needed for an exact resume.

RUN/checkpoints/step_XXXXXXXX/
    config.json, model.safetensors   plain weights (model.io.save): load anywhere, no TE/compile/DDP keys
    tokenizer.json                   the data's tokenizer
    trainer_state.json               step, counters, loader state, RNG states, optimizer hyper-parameters ...
    trainer_state.safetensors        ... and every tensor they refer to (optimizer moments, RNG states)
    ema.safetensors                  EMA weights (with --ema)
    checksums.json                   SHA-256 of every file above, verified by --resume
Nothing here is a pickle: reading a checkpoint never executes code. A checkpoint is written to
RUN/checkpoints/.tmp-step_X and renamed when complete (model.fileio.atomic_dir), so a crash (even SIGKILL) or
a full disk never leaves a folder that looks complete. RUN/.lock (pid and host) keeps a second process out.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kernels.common import FurnaceError
from model.fileio import atomic_dir, atomic_write, read_json_object, verify_checksums, write_checksums
from model.io import checkpoint_step, latest_checkpoint, save as save_model, unwrap

log = logging.getLogger("furnace")
STATE_FILE, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
OLD_STATE_FILE = "trainer_state.pt"  # the pickle of earlier versions: refused, never unpickled


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


# ---- trainer state as JSON + safetensors (no pickle) -------------------------------------------------------
def _encode(obj, tensors: dict, where: str):
    """JSON-able form of `obj`; tensors go to `tensors` and are referred to by name. Tuples, non-string dict
    keys (the optimizer's parameter ids), numpy arrays and bytes are tagged so that decoding restores them."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):  # numpy's RNG state (uint32): stored widened, restored to its dtype
        return {"__ndarray__": _encode(torch.from_numpy(obj.astype(np.int64)), tensors, where), "dtype": obj.dtype.str}
    if isinstance(obj, (bytes, io.BytesIO)):  # older TransformerEngine's FP8 extra state
        raw = obj.getvalue() if isinstance(obj, io.BytesIO) else obj
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
        return {"__bytes__": _encode(t, tensors, where), "bytesio": isinstance(obj, io.BytesIO)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, where) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, where) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state: {where} holds a {type(obj).__name__}, which a checkpoint cannot store")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return _decode(obj["__ndarray__"], tensors).numpy().astype(np.dtype(obj["dtype"]))
    if "__bytes__" in obj:
        raw = _decode(obj["__bytes__"], tensors).numpy().tobytes()
        return io.BytesIO(raw) if obj.get("bytesio") else raw
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def write_trainer_state(d: Path, state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(state, tensors, "state")
    save_file(tensors, str(d / STATE_TENSORS))
    (d / STATE_FILE).write_text(json.dumps(doc) + "\n")


# ---- saving ------------------------------------------------------------------------------------------------
def unsafe_to_save(model: torch.nn.Module, bad_in_row: int) -> str | None:
    """Why no checkpoint may be written now (inside a streak of non-finite steps, or a floating-point weight or
    buffer holding NaN or inf), or None. So the newest checkpoint is always the last good one, and keep-last
    rotation never deletes it."""
    if bad_in_row:
        return f"inside a streak of {bad_in_row} non-finite steps"
    for name, t in unwrap(model).state_dict().items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"weight {name} is not finite"
    return None


def last_good_checkpoint(run_dir: Path) -> str:
    """For messages: the checkpoint a diverged or stopped run continues from, and how."""
    ck = latest_checkpoint(run_dir)
    if ck is None:
        return (f"none was written yet in {run_dir}; start it over with --resume (new options, e.g. a lower --lr, "
                f"are taken)")
    return f"{ck}; continue from it with --resume (e.g. with a lower --lr)"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict, tokenizer_dir: Path | None,
                    keep_last: int, ema: dict | None = None, weights_only_older: bool = False) -> Path:
    """Write step `step` atomically (checksummed), then drop all but the newest `keep_last` checkpoints.
    `weights_only_older` (--keep-weights-only): the kept checkpoints other than the newest lose their trainer
    state and EMA (about two thirds of their size; their checksums.json is rewritten) and keep their weights:
    loadable, no longer resumable."""
    ck_root = run_dir / "checkpoints"
    final = ck_root / f"step_{step:08d}"
    with atomic_dir(final) as tmp:  # creates ck_root; re-saving a step (Ctrl-C right after a periodic save) replaces it
        save_model(model, tmp)
        if tokenizer_dir is not None:
            for name in ("tokenizer.json", "tokenizer_meta.json", "chat_template.json"):
                if (tokenizer_dir / name).is_file():
                    atomic_write(tmp / name, (tokenizer_dir / name).read_bytes())
        write_trainer_state(tmp, state)
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        write_checksums(tmp)
    done = sorted((p for p in ck_root.iterdir() if p.is_dir() and checkpoint_step(p) is not None), key=checkpoint_step)
    for old in done[:-keep_last]:
        shutil.rmtree(old)
    if weights_only_older:
        for old in done[-keep_last:-1]:
            if (old / STATE_FILE).exists():
                for name in (STATE_FILE, STATE_TENSORS, "ema.safetensors"):
                    (old / name).unlink(missing_ok=True)
                write_checksums(old)
    return final


def load_trainer_state(ckpt: Path) -> dict:
    """Verify every file of `ckpt` against its checksums, then read the trainer state (JSON + safetensors)."""
    f = ckpt / STATE_FILE
    if not f.is_file():
        if (ckpt / OLD_STATE_FILE).is_file():
            raise FurnaceError(f"--resume: {ckpt / OLD_STATE_FILE} is a pickle written by an older Furnace; it is not "
                               f"read because unpickling can execute code. Continue with --init {ckpt} (weights only) "
                               f"in a new --out")
        raise FurnaceError(f"--resume: {ckpt} has no {STATE_FILE} (a weights-only checkpoint? use --init)")
    verify_checksums(ckpt, required=True)
    try:
        doc = json.loads(f.read_text())
        tensors = load_file(str(ckpt / STATE_TENSORS))
        return _decode(doc, tensors)
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError, KeyError, ValueError) as e:
        raise FurnaceError(f"--resume: {f} is unreadable ({type(e).__name__}: {e})") from None


# ---- the run folder: one process at a time ----------------------------------------------------------------
LOCK_FILE = ".lock"
_HELD: dict[Path, int] = {}  # run folders this process holds (fd of the locked file), released at exit


def lock_run_dir(run_dir: Path, claim: bool = True) -> None:
    """Take RUN/.lock (an exclusive flock) or refuse at once naming the holder; with `claim`, write 'pid host'
    into it. The kernel drops a flock when its process dies, so a lock left by a killed run is taken over."""
    import fcntl
    if os.environ.get("RANK", "0") != "0":  # only rank 0 writes the folder
        return
    fd = _HELD.get(run_dir.resolve())
    if fd is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FurnaceError(f"--out {run_dir} is in use by a running job ({holder}, see {run_dir / LOCK_FILE}); "
                               f"wait for it to finish, stop it, or choose another --out") from None
        _HELD[run_dir.resolve()] = fd
    me = f"pid {os.getpid()} host {socket.gethostname()}\n"
    old = os.pread(fd, 200, 0).decode(errors="replace")
    if claim and old != me:
        if old.strip():
            log.info(f"--out {run_dir}: taking over the lock left by a stopped run ({old.strip()})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)


def unlock_run_dir(run_dir: Path) -> None:
    fd = _HELD.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


def check_out_dir(run_dir: Path, sections: dict[str, tuple[dict, tuple[str, ...]]], resume: bool) -> Path | None:
    """Lock OUT, refuse one holding a different run unless --resume; returns the checkpoint to resume from
    (None: a fresh start). `sections`: {config.json section: (this run's values, the names a resumed run must
    keep)}; the others (lr, schedule, clip, max-steps, cadences) may change on --resume, logged: that is how
    a diverged run is continued with a lower --lr."""
    if (run_dir / LOCK_FILE).exists():  # a folder in use is named as such before anything else
        lock_run_dir(run_dir, claim=False)
    try:
        ckpt = _check_out_dir(run_dir, sections, resume)
        if run_dir.is_dir():  # a new folder is created (and locked) by the run itself: bad input leaves no trace
            lock_run_dir(run_dir)
    except FurnaceError:
        unlock_run_dir(run_dir)
        raise
    return ckpt


def _check_out_dir(run_dir: Path, sections: dict, resume: bool) -> Path | None:
    cfg_file, ck_dir, ckpt = run_dir / "config.json", run_dir / "checkpoints", latest_checkpoint(run_dir)
    has_run = cfg_file.is_file() or ck_dir.is_dir()
    kept = sorted(p.name for p in ck_dir.iterdir() if not p.name.startswith(".tmp-")) if ck_dir.is_dir() else []
    if ckpt is None and kept:  # step folders, none complete: never deleted, a person must look
        raise FurnaceError(f"--out {run_dir}: {ck_dir} holds {', '.join(kept[:3])} but no complete checkpoint "
                           f"(config.json + model.safetensors); move them away or choose another --out")
    if has_run and ckpt is None:  # killed before its first checkpoint: nothing to keep
        if not resume:
            raise FurnaceError(f"--out {run_dir} holds a run that stopped before its first checkpoint, so there is "
                               f"nothing to continue: pass --resume to start it over in this folder, or delete it")
        log.info(f"--resume: {run_dir} holds no checkpoint yet (the run stopped before its first one): "
                 f"starting it over from step 0")
        if os.environ.get("RANK", "0") == "0":  # under DDP, rank 0 alone writes the folder
            for f in (cfg_file, run_dir / "metrics.jsonl"):
                f.unlink(missing_ok=True)
            shutil.rmtree(ck_dir, ignore_errors=True)  # only unfinished .tmp-* folders (checked above)
        return None
    if not resume:
        if has_run:
            raise FurnaceError(f"--out {run_dir} already holds a training run; pass --resume to continue it, "
                               f"or choose another --out (nothing was changed)")
        if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            raise FurnaceError(f"--out {run_dir} exists and is not empty; choose another --out")
        return None
    if ckpt is None:
        raise FurnaceError(f"--resume: {run_dir} holds no training run to resume (no checkpoints/ and no "
                           f"config.json); run without --resume to start one")
    saved = read_json_object(cfg_file, "run options", "; the run folder is damaged") if cfg_file.is_file() else {}
    for section, (values, defining) in sections.items():
        old = saved.get(section, {})
        changed = {k: (old[k], v) for k, v in values.items() if k in old and k != "resume" and old[k] != v}
        diffs = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items() if k in defining]
        if diffs:
            raise FurnaceError(f"--resume {run_dir}: options differ from the saved run ({'; '.join(diffs)}); "
                               f"resume with the same options or start a new --out")
        for k, (a, b) in changed.items():
            log.info(f"--resume: --{k.replace('_', '-')} {a!r} -> {b!r} from step {checkpoint_step(ckpt)} on")
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
    atomic_write(path, "".join(ln + "\n" for ln in kept))
