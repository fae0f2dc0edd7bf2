"""Start-up shared by pretraining, SFT and DPO: devices and DDP, precision, output folder, model build
(fresh, --init or --resume), wrapping (FP8, activation checkpointing, compile, DDP) and the run record."""
from __future__ import annotations

import functools
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model.config import GPTConfig
from model.errors import FurnaceError
from model.fileio import atomic_write_json
from model.flops import device_peak_name, flops_per_token, peak_tflops
from model.gpt import GPT
from model.io import load as load_model, resolve_checkpoint
from train.loop import LoopConfig
from train.metrics import versions
from train.options import TrainOptions
from train.precision import Precision, convert_linears, decide_precision, resolve_device

log = logging.getLogger("furnace")
REPO = Path(__file__).resolve().parents[1]


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

    def close(self):
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_runtime(opts: TrainOptions) -> Runtime:
    """Single process, or DDP under torchrun (NCCL on GPU, gloo on CPU). Only rank 0 logs and saves."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(opts.device)
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if rank != 0:
            logging.getLogger("furnace").setLevel(logging.WARNING)
        rt = Runtime(device=device, rank=rank, world_size=world)
        log.info(f"DDP: {world} processes, backend {dist.get_backend()}")
    else:
        rt = Runtime(device=resolve_device(opts.device))
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rt.precision = decide_precision(rt.device, opts.dtype, opts.fp8, opts.fp8_backend, opts.fp8_strict)
    return rt


def with_runtime(job, opts: TrainOptions, *args) -> dict:
    """Run `job(opts, *args, rt)` inside a runtime (devices, DDP, precision) that is always closed."""
    rt = init_runtime(opts)
    try:
        return job(opts, *args, rt)
    finally:
        rt.close()


def default_out(name: str) -> Path:
    """runs/NAME, or runs/NAME-2, -3, ... when taken (only when --out was not given)."""
    base = Path("runs") / name
    if not base.exists():
        return base
    i = 2
    while Path(f"{base}-{i}").exists():
        i += 1
    return Path(f"{base}-{i}")


def latest_default_out(name: str) -> Path:
    """For --resume without --out: the newest runs/NAME[-N] that exists."""
    base = Path("runs") / name
    found = [p for p in [base] + sorted(Path("runs").glob(f"{name}-*")) if p.is_dir()]
    found = [p for p in found if p == base or p.name[len(name) + 1:].isdigit()]
    if not found:
        raise FurnaceError(f"--resume: no run to continue under runs/{name}[-N]; pass --out RUN_DIR")
    return max(found, key=lambda p: 0 if p == base else int(p.name[len(name) + 1:]))


def pad_vocab(n: int, multiple: int = 64) -> int:
    return multiple * ((n + multiple - 1) // multiple)


def build_model(opts: TrainOptions, cfg: GPTConfig, rt: Runtime) -> GPT:
    """A fresh model from `cfg`, or the --init weights (optionally with RoPE scaling for a longer context)."""
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
        icfg = icfg.replace(kernels=opts.kernels)
        model = GPT(icfg)
        model.load_state_dict(src.state_dict(), strict=True)
        log.info(f"--init: weights from {resolve_checkpoint(opts.init)}")
    else:
        model = GPT(cfg)
    return model.to(rt.device)


def wrap_model(model: GPT, opts: TrainOptions, rt: Runtime) -> torch.nn.Module:
    """FP8 conversion, activation checkpointing, torch.compile, then DDP."""
    convert_linears(model, rt.precision)
    model.activation_checkpointing = opts.activation_checkpointing
    if opts.activation_checkpointing and rt.precision.fp8 == "te":
        # torch.utils.checkpoint recomputes in backward, outside fp8_autocast: TE's te.distributed.checkpoint
        # restores the FP8 state and reuses the forward's scaling factors (TransformerEngine issue 415).
        from transformer_engine.pytorch.distributed import checkpoint as te_checkpoint
        model.checkpoint_fn = functools.partial(te_checkpoint, use_reentrant=False)
    wrapped: torch.nn.Module = model
    if opts.compile:
        wrapped = torch.compile(wrapped)
    if rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(wrapped, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return wrapped


def check_seq_len(seq_len: int, cfg: GPTConfig, preset: str) -> None:
    if seq_len > cfg.max_seq_len:
        raise FurnaceError(
            f"--seq-len {seq_len} exceeds the model's context of {cfg.max_seq_len} (preset {preset}); "
            f"use --seq-len <= {cfg.max_seq_len}, or extend a trained model with "
            f"--init CKPT --rope-scaling yarn --rope-factor {max(2, -(-seq_len // cfg.max_seq_len))}")


def loop_config(opts: TrainOptions, model: GPT, seq_len: int, rt: Runtime, max_steps: int,
                eval_batches: int) -> LoopConfig:
    peak, peak8 = (opts.peak_tflops or None), None
    if rt.device.type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        peak = peak or peak_tflops(name, "bf16")
        peak8 = peak_tflops(name, "fp8")
        if peak is None:
            log.info(f"MFU: unknown device {name!r} (pass --peak-tflops to report MFU)")
    warmup = opts.warmup or min(100, max(1, max_steps // 20))
    return LoopConfig(max_steps=max_steps, grad_accum=opts.grad_accum, lr=opts.lr, min_lr=opts.min_lr,
                      warmup=warmup, schedule=opts.schedule, wsd_decay=opts.wsd_decay, grad_clip=opts.grad_clip,
                      z_loss=opts.z_loss, eval_every=opts.eval_every, eval_batches=eval_batches,
                      save_every=opts.save_every, keep_last=opts.keep_last, ema=opts.ema,
                      max_bad_steps=opts.max_bad_steps, log_every=opts.log_every,
                      flops_per_token=flops_per_token(model.config, seq_len), peak_tflops=peak,
                      peak_tflops_fp8=peak8)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cc = torch.cuda.get_device_capability(device)
        return f"{name} (cc {cc[0]}.{cc[1]}, peak row: {device_peak_name(name)})"
    return f"cpu ({os.cpu_count()} logical cores, {torch.get_num_threads()} threads)"


def write_run_config(run_dir: Path, opts: TrainOptions, model: GPT, rt: Runtime, extra: dict) -> None:
    """OUT/config.json: resolved options, model config, device, versions, git commit."""
    rec = {"train": opts.to_dict(), "model": model.config.to_dict(), "num_params": model.num_params(),
           "device": device_description(rt.device), "world_size": rt.world_size,
           "precision": {"name": rt.precision.name, "reason": rt.precision.reason,
                         "fp8_layers": len(rt.precision.converted)},
           "versions": versions(), "git_commit": git_commit(), **extra}
    atomic_write_json(run_dir / "config.json", rec, default=str)
