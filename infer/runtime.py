"""Inference set-up shared by the CLIs: threads, device, dtype, loading a checkpoint with its tokenizer."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from data.tokenizer import TOKENIZER_FILE, load_tokenizer
from infer.quant import quantize
from kernels.common import FurnaceError
from model.io import load, resolve_checkpoint

log = logging.getLogger("furnace")


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads share a core's load/store units and do not help a
    bandwidth-bound decode). From /proc/cpuinfo (physical id, core id) pairs; else the usable CPU count."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, phys = set(), "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                cores.add((phys, line.split(":")[1].strip()))
        if cores:
            return max(1, min(len(cores), usable))
    except OSError:
        pass
    return max(1, usable)


def set_threads(n: int | None = None) -> int:
    n = n or physical_cores()
    if n < 1:
        raise FurnaceError(f"--threads {n}: expected a positive integer")
    torch.set_num_threads(n)
    return n


def pick_device(device: str | None) -> torch.device:
    """--device for inference: the same rules as training (train.precision.resolve_device)."""
    from train.precision import resolve_device
    d = resolve_device(device or "auto")
    if d.type not in ("cpu", "cuda"):
        raise FurnaceError(f"--device {device}: expected cpu or cuda")
    return d


def pick_dtype(dtype: str | None, device: torch.device) -> tuple[str, str]:
    """(mode, reason). Default: int8 on CPU (fastest, keeps the greedy continuation: see infer/README.md),
    bf16 on CUDA."""
    if dtype in (None, "", "auto"):
        if device.type == "cpu":
            return "int8", "CPU default (decode is bandwidth bound; int8 reads 4x fewer bytes than fp32)"
        return "bf16", "CUDA default"
    return dtype, "--dtype"


def load_tokenizer_for(ckpt: str | os.PathLike, tokenizer: str | None = None):
    """The tokenizer stored with the checkpoint, or an explicit --tokenizer path."""
    if tokenizer:
        return load_tokenizer(tokenizer)
    d = resolve_checkpoint(ckpt)
    if not (d / TOKENIZER_FILE).is_file():
        raise FurnaceError(f"checkpoint {d}: has no {TOKENIZER_FILE}; pass --tokenizer PATH (the data folder the "
                           f"model was trained on, or its {TOKENIZER_FILE})")
    return load_tokenizer(d)


def load_for_inference(ckpt: str | os.PathLike, device: str | None = "cpu", dtype: str | None = "fp32",
                       tokenizer: str | None = None):
    """-> (model quantized for inference, tokenizer, mode). Checks the tokenizer fits the model."""
    dev = pick_device(device)
    tok = load_tokenizer_for(ckpt, tokenizer)
    model = load(ckpt, device=dev)
    if tok.vocab_size > model.config.vocab_size:
        raise FurnaceError(f"tokenizer {tok.source} has {tok.vocab_size} tokens but the model at {ckpt} has "
                           f"vocab_size={model.config.vocab_size}: they do not belong together")
    mode, why = pick_dtype(dtype, dev)
    log.info(f"precision: {mode} ({why}); device {dev}; threads {torch.get_num_threads()}")
    return quantize(model, mode), tok, mode
