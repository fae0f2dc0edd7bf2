"""The part of a training job shared by pretraining, SFT and DPO: everything after the model and the loaders
exist. Resume weights, wrap (FP8, compile, DDP), optimizer, loop config, run record, wandb, metrics, the
Trainer (with its resumed state), fit, clean-up and the loss plot."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file

from model.gpt import GPT
from model.io import load as load_model
from train.checkpoint import load_trainer_state, lock_run_dir, truncate_metrics, unlock_run_dir
from train.loop import Trainer, count_targets, lm_loss
from train.metrics import MetricsLog, init_wandb, plot_losses
from train.optim import build_optimizer
from train.options import TrainOptions
from train.setup import Runtime, loop_config, wrap_model, write_run_config

log = logging.getLogger("furnace")


def run_loop(opts: TrainOptions, rt: Runtime, model: GPT, run_dir: Path, resume_ckpt: Path | None,
             train_loader, val_loader, tokenizer_dir: Path | None, *, seq_len: int, eval_batches: int,
             run_record: dict, loss_fn: Callable = lm_loss, count_fn: Callable = count_targets,
             eval_fn: Callable | None = None, wandb_config: dict | None = None,
             flops_per_unit: float | None = None, unit: str = "tok") -> dict:
    """Train `model` (unwrapped, on rt.device) to opts.max_steps; returns the loop's summary.
    `run_record` goes into OUT/config.json beside the options (a fresh run only). `flops_per_unit`: training
    FLOPs per loss unit counted by `count_fn` when that unit is not an input token (SFT's trained tokens,
    DPO's pairs), so MFU stays right; default: model.flops per token at `seq_len`."""
    if resume_ckpt is not None:
        model.load_state_dict(load_model(resume_ckpt).state_dict())
    wrapped = wrap_model(model, opts, rt)
    optimizer = build_optimizer(model, opts.lr, opts.weight_decay, rt.device.type)
    lcfg = loop_config(opts, model, seq_len, rt, opts.max_steps, eval_batches)
    if flops_per_unit is not None:
        lcfg.flops_per_token = flops_per_unit
    lcfg.unit = unit

    wandb_run = None
    state = load_trainer_state(resume_ckpt) if resume_ckpt is not None else None
    if rt.is_main:
        lock_run_dir(run_dir)  # creates it; a second process on the same --out stops here
        if state is not None:
            truncate_metrics(run_dir / "metrics.jsonl", state["step"])
        else:
            write_run_config(run_dir, opts, model, rt, run_record)
        if opts.wandb:
            wandb_run, _ = init_wandb(opts, run_dir, (state or {}).get("extra", {}).get("wandb_id"),
                                      wandb_config or opts.to_dict())
    metrics = MetricsLog(run_dir, enabled=rt.is_main, wandb_run=wandb_run)
    trainer = Trainer(lcfg, wrapped, optimizer, train_loader, val_loader, rt.precision, rt.device, run_dir,
                      tokenizer_dir, metrics, rank=rt.rank, world_size=rt.world_size,
                      loss_fn=loss_fn, count_fn=count_fn, eval_fn=eval_fn)
    if state is not None:
        trainer.load_trainer_state(state)
        if (resume_ckpt / "ema.safetensors").is_file():
            trainer.load_ema(load_file(str(resume_ckpt / "ema.safetensors")))
        log.info(f"resumed from {resume_ckpt} at step {trainer.state.step}")
    if wandb_run is not None:
        trainer.state.extra["wandb_id"] = wandb_run.id
    try:
        summary = trainer.fit()
    finally:
        metrics.close()
        unlock_run_dir(run_dir)
        if wandb_run is not None:
            wandb_run.finish()
    if rt.is_main:
        plot_losses(run_dir)
        log.info(f"done: {summary}")
    return summary
