"""Save and load model weights: `config.json` + `model.safetensors` with plain parameter names.

A checkpoint directory holds those two files (training checkpoints hold more beside them).
A training run directory holds `checkpoints/step_XXXXXXXX/`; `load` picks the newest complete one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import GPTConfig
from kernels.common import FurnaceError
from model.fileio import atomic_path, atomic_write, read_json_object, verify_checksums
from model.gpt import GPT

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


def clean_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unwrapped, contiguous weights with plain names; a tied LM head is stored once (as embed)."""
    inner = unwrap(model)
    sd = {}
    for name, t in inner.state_dict().items():
        for p in _PREFIXES:
            while name.startswith(p):
                name = name[len(p):]
        if name.endswith("_extra_state"):  # TransformerEngine metadata never enters a checkpoint
            continue
        sd[name] = t.detach().contiguous()
    if getattr(inner, "config", None) is not None and inner.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """`with eval_mode(model) as m:` the model in eval mode, put back in its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def weights_file(ckpt: Path) -> Path:
    """model.safetensors, or adapter.safetensors in a LoRA adapter checkpoint (model/lora.py)."""
    from model.lora import ADAPTER_WEIGHTS, is_adapter_checkpoint
    return Path(ckpt) / (ADAPTER_WEIGHTS if is_adapter_checkpoint(ckpt) else WEIGHTS_FILE)


def save(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write config.json and model.safetensors into `directory` (created if needed); a model carrying LoRA
    adapters writes an adapter-only checkpoint instead (model.lora.save_adapter)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    inner = unwrap(model)
    if getattr(inner, "lora", None) is not None:
        from model.lora import save_adapter
        return save_adapter(inner, d)
    atomic_write(d / CONFIG_FILE, json.dumps(inner.config.to_dict(), indent=2) + "\n")
    with atomic_path(d / WEIGHTS_FILE) as tmp:
        save_file({k: v.cpu() for k, v in clean_state_dict(inner).items()}, str(tmp),
                  metadata={"format": "pt", "furnace": "1"})
    return d


def checkpoint_step(path: Path) -> int | None:
    m = re.fullmatch(r"step_(\d+)", path.name)
    return int(m.group(1)) if m else None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint under RUN/checkpoints (temporary folders never count)."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return None
    done = [p for p in ck.iterdir() if p.is_dir() and checkpoint_step(p) is not None
            and (p / CONFIG_FILE).is_file() and weights_file(p).is_file()]
    return max(done, key=checkpoint_step, default=None)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir, a run dir (-> its newest checkpoint) or a model.safetensors file -> checkpoint dir."""
    p = Path(path)
    if not p.exists():
        raise FurnaceError(f"checkpoint {p}: no such file or directory")
    if p.is_file():
        if p.name != WEIGHTS_FILE:
            raise FurnaceError(f"checkpoint {p}: expected a directory or a {WEIGHTS_FILE} file")
        p = p.parent
    if (p / WEIGHTS_FILE).is_file() or (p / CONFIG_FILE).is_file() and weights_file(p).is_file():
        return p
    latest = latest_checkpoint(p)  # a training run dir: its newest complete checkpoint
    if latest is None:
        raise FurnaceError(f"checkpoint {p}: found neither {CONFIG_FILE} + {WEIGHTS_FILE} "
                           f"nor a complete checkpoints/step_* folder")
    return latest


def load_config(ckpt_dir: Path) -> GPTConfig:
    f = ckpt_dir / CONFIG_FILE
    if not f.is_file():
        raise FurnaceError(f"checkpoint {ckpt_dir}: {CONFIG_FILE} is missing")
    raw = read_json_object(f, "model config fields")
    return GPTConfig.from_dict(raw.get("model", raw), source=str(f))


def load(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load a GPT from a checkpoint dir, a run dir (newest checkpoint) or a model.safetensors file.
    Returns the model in eval mode on `device`. Errors name the path and what was wrong.
    A LoRA adapter checkpoint loads as its base (checked by hash) with the adapters merged: a plain GPT."""
    ckpt = resolve_checkpoint(path)
    from model.lora import is_adapter_checkpoint, load_adapted, merge
    if is_adapter_checkpoint(ckpt):
        model = merge(load_adapted(ckpt))
        model = model.to(device)
        return (model.to(dtype) if dtype is not None else model).eval()
    cfg = load_config(ckpt)
    wf = ckpt / WEIGHTS_FILE
    if not wf.is_file():
        raise FurnaceError(f"checkpoint {ckpt}: {WEIGHTS_FILE} is missing")
    verify_checksums(ckpt, names=(CONFIG_FILE, WEIGHTS_FILE))  # a training checkpoint's checksums.json
    try:
        sd = load_file(str(wf))
    except (SafetensorError, OSError, ValueError) as e:
        raise FurnaceError(f"{wf}: unreadable or truncated safetensors file ({e})") from None
    with torch.device("meta"):
        model = GPT(cfg)
    expected = clean_state_dict(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise FurnaceError(f"{wf}: weights do not match {ckpt / CONFIG_FILE}: "
                           f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise FurnaceError(f"{wf}: {k} has shape {tuple(t.shape)}, config expects {tuple(expected[k].shape)}")
    for k, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FurnaceError(f"{wf}: weight {k} holds NaN or inf (saved from a diverged run?); "
                               f"use an earlier checkpoint of that run")
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model = _materialize_buffers(model, device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _materialize_buffers(model: GPT, device) -> GPT:
    """After assign-loading onto meta, rebuild the non-persistent RoPE tables and move to device."""
    from model.rope import rope_tables
    cos, sin = rope_tables(model.config, model.config.max_seq_len)
    model.rope_cos = cos
    model.rope_sin = sin
    return model.to(device)
