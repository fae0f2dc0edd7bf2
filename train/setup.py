"""Start-up shared by pretraining, SFT and DPO: devices and DDP, precision, output folder, model build
(fresh or --init)."""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model.config import GPTConfig
from kernels.common import FurnaceError
from model.gpt import GPT
from model.io import load as load_model, resolve_checkpoint
from train.options import RUN_DEFINING, TrainOptions
from train.precision import Precision, decide_precision, resolve_device

log = logging.getLogger("furnace")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    precision: Precision | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_runtime(opts: TrainOptions) -> Runtime:
    """Single process, or DDP under torchrun (NCCL on GPU, gloo on CPU). Only rank 0 logs and saves.
    Use it as `with init_runtime(opts) as rt:` so the process group is always closed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rt = Runtime(resolve_device(opts.device), rank=int(os.environ["RANK"]) if world > 1 else 0, world_size=world)
    if world > 1:
        if rt.device.type == "cuda":
            rt.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(rt.device)
        dist.init_process_group(backend="nccl" if rt.device.type == "cuda" else "gloo")
        if not rt.is_main:
            log.setLevel(logging.WARNING)
        log.info(f"DDP: {world} processes, backend {dist.get_backend()}")
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rt.precision = decide_precision(rt.device, opts.dtype, opts.fp8, opts.fp8_backend, opts.fp8_strict)
    return rt


def open_run_dir(opts: TrainOptions, name: str, saved: dict | None = None) -> tuple[Path, Path | None]:
    """--out resolved into `opts` (default: runs/NAME, or -2, -3... when taken; with --resume the newest of
    those), then checked and locked (train.checkpoint.check_out_dir) -> (run folder, checkpoint to resume
    from or None). `saved`: further config.json sections a resumed run must agree on (fine-tuning)."""
    from train.checkpoint import check_out_dir
    if not opts.out:
        base = Path("runs") / name
        if opts.resume:
            found = [1] * base.is_dir() + [int(p.name[len(name) + 1:]) for p in Path("runs").glob(f"{name}-*")
                                           if p.is_dir() and p.name[len(name) + 1:].isdigit()]
            if not found:
                raise FurnaceError(f"--resume: no run to continue under runs/{name}[-N]; pass --out RUN_DIR")
            i = max(found)
        else:
            i = next(i for i in itertools.count(1) if not (base if i == 1 else Path(f"{base}-{i}")).exists())
        opts.out = str(base if i == 1 else f"{base}-{i}")
        if i > 1 and not opts.resume:
            log.info(f"out: {base} already holds a run: this one goes to {opts.out} (pass this folder to the next "
                     f"command; --out chooses the folder)")
    sections = {"train": (opts.to_dict(), RUN_DEFINING), **(saved or {})}
    return Path(opts.out), check_out_dir(Path(opts.out), sections, opts.resume)


def build_model(opts: TrainOptions, cfg: GPTConfig, rt: Runtime) -> GPT:
    """A fresh model from `cfg`, or the --init weights (optionally with RoPE scaling for a longer context);
    either runs the --kernels implementation (a choice of this process: checkpoints do not record it)."""
    torch.manual_seed(opts.seed)
    if opts.init:
        src = load_model(opts.init, device="cpu")
        icfg = src.config
        if opts.rope_scaling and opts.rope_scaling != "none":
            factor = opts.rope_factor or 2.0
            icfg = icfg.replace(rope_scaling=opts.rope_scaling, rope_factor=factor,
                                rope_original_max_seq_len=icfg.rope_original_max_seq_len or icfg.max_seq_len,
                                max_seq_len=int(icfg.max_seq_len * factor))
            log.info(f"--init: RoPE {opts.rope_scaling} x{factor}: context {src.config.max_seq_len} -> {icfg.max_seq_len}")
        model = GPT(icfg)
        model.load_state_dict(src.state_dict(), strict=True)
        log.info(f"--init: weights from {resolve_checkpoint(opts.init)}")
    else:
        model = GPT(cfg)
    model.set_kernels(opts.kernels)
    return model.to(rt.device)


def check_seq_len(seq_len: int, cfg: GPTConfig, preset: str) -> None:
    if seq_len > cfg.max_seq_len:
        raise FurnaceError(
            f"--seq-len {seq_len} exceeds the model's context of {cfg.max_seq_len} (preset {preset}); "
            f"use --seq-len <= {cfg.max_seq_len}, or extend a trained model with "
            f"--init CKPT --rope-scaling yarn --rope-factor {max(2, -(-seq_len // cfg.max_seq_len))}")
