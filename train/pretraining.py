"""The pretraining job behind `python train/pretrain.py`: resolve defaults, prepare the embedded corpus
when needed, build or resume the model, and run the shared loop."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from data import TokenLoader, check_tokenizer_match, load_tokenizer, parse_data_arg, prepare
from data.build import DEFAULT_DATA_DIR as DEFAULT_DATA
from model.config import get_preset
from model.errors import FurnaceError
from model.io import load as load_model, resolve_checkpoint
from train.checkpoint import check_out_dir, load_trainer_state, truncate_metrics
from train.loop import Trainer, lm_loss
from train.metrics import MetricsLog, init_wandb, plot_losses
from train.optim import build_optimizer
from train.options import RUN_DEFINING, TrainOptions
from train.setup import (Runtime, build_model, check_seq_len, default_out, init_runtime, latest_default_out,
                         loop_config, pad_vocab, wrap_model, write_run_config)

log = logging.getLogger("furnace")
CPU_DEFAULTS = dict(preset="tiny", batch_size=8, seq_len=256, max_steps=300)
GPU_DEFAULTS = dict(preset="26m", batch_size=32, seq_len=1024, max_steps=2000)


def resolve_defaults(opts: TrainOptions, rt: Runtime) -> None:
    """Fill the options left at 0/'' with the device's defaults, in place (so config.json is concrete)."""
    d = GPU_DEFAULTS if rt.device.type == "cuda" else CPU_DEFAULTS
    opts.preset = opts.preset or d["preset"]
    opts.batch_size = opts.batch_size or d["batch_size"]
    cfg = get_preset(opts.preset)
    opts.seq_len = opts.seq_len or min(d["seq_len"], cfg.max_seq_len)
    if not opts.max_steps:
        per_step = opts.batch_size * opts.seq_len * opts.grad_accum * rt.world_size
        opts.max_steps = -(-opts.tokens // per_step) if opts.tokens else d["max_steps"]


def ensure_data(opts: TrainOptions, rt: Runtime) -> list[tuple[str, float]]:
    """--data sources, or the embedded default corpus (prepared once, by rank 0)."""
    if opts.data:
        sources = parse_data_arg(opts.data)
        for d, _ in sources:
            if not Path(d).is_dir():
                raise FurnaceError(f"--data {d}: no such folder (make one with: python data/prepare.py --out {d} ...)")
        return sources
    if not (DEFAULT_DATA / "manifest.json").is_file():
        if rt.is_main:
            log.info(f"data: preparing the embedded default corpus (Python standard library) in {DEFAULT_DATA}")
            prepare(DEFAULT_DATA)
        rt.barrier()
    opts.data = str(DEFAULT_DATA)
    return [(str(DEFAULT_DATA), 1.0)]


def run(opts: TrainOptions) -> dict:
    rt = init_runtime(opts)
    try:
        return _run(opts, rt)
    finally:
        rt.close()


def _run(opts: TrainOptions, rt: Runtime) -> dict:
    resolve_defaults(opts, rt)
    sources = ensure_data(opts, rt)
    data_name = Path(sources[0][0]).name
    if not opts.out:
        opts.out = str(latest_default_out(f"{opts.preset}-{data_name}") if opts.resume
                       else default_out(f"{opts.preset}-{data_name}"))
    run_dir = Path(opts.out)
    resume_ckpt = check_out_dir(run_dir, opts.to_dict(), opts.resume, RUN_DEFINING)

    loader = TokenLoader(sources, opts.batch_size, opts.seq_len, split="train", seed=opts.seed,
                         rank=rt.rank, world_size=rt.world_size, device=rt.device)
    val = TokenLoader(sources, opts.batch_size, opts.seq_len, split="val", mode="sequential", device=rt.device)
    tok_dir = Path(sources[0][0])

    cfg = get_preset(opts.preset).replace(kernels=opts.kernels)
    if loader.vocab_size is not None:
        cfg.vocab_size = pad_vocab(loader.vocab_size)
    else:  # an llm.c / modded-nanogpt folder without tokenizer.json: GPT-2 tokens, presumably
        log.info(f"data {sources[0][0]} has no tokenizer.json: using preset {opts.preset}'s vocab {cfg.vocab_size} "
                 f"(GPT-2 shards need >= 50257, e.g. --preset 124m); put a tokenizer.json beside the shards "
                 f"to chat with the result")
    for other, what in ((opts.init, "--init"), (str(resume_ckpt) if resume_ckpt else "", "--resume")):
        if other:
            ck = resolve_checkpoint(other)
            other_sha = load_tokenizer(ck).sha256 if (ck / "tokenizer.json").is_file() else None
            check_tokenizer_match(loader.tokenizer_sha256, other_sha, f"data {sources[0][0]}", f"{what} {ck}")
    model = build_model(opts, cfg, rt)
    check_seq_len(opts.seq_len, model.config, opts.preset)
    if loader.vocab_size > model.config.vocab_size:
        raise FurnaceError(f"--init model has vocab {model.config.vocab_size} < the data tokenizer's {loader.vocab_size}")

    if resume_ckpt is not None:
        model.load_state_dict(load_model(resume_ckpt).state_dict())
    wrapped = wrap_model(model, opts, rt)
    optimizer = build_optimizer(model, opts.lr, opts.weight_decay, rt.device.type)
    eval_batches = max(1, opts.eval_tokens // (opts.batch_size * opts.seq_len))
    lcfg = loop_config(opts, model, opts.seq_len, rt, opts.max_steps, eval_batches)

    wandb_run = None
    state = load_trainer_state(resume_ckpt) if resume_ckpt is not None else None
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if state is not None:
            truncate_metrics(run_dir / "metrics.jsonl", state["step"])
        else:
            write_run_config(run_dir, opts, model, rt, {"data": sources})
        if opts.wandb:
            wandb_run, _ = init_wandb(opts, run_dir, (state or {}).get("extra", {}).get("wandb_id"), opts.to_dict())
    metrics = MetricsLog(run_dir, enabled=rt.is_main, wandb_run=wandb_run)
    trainer = Trainer(lcfg, wrapped, optimizer, loader, val, rt.precision, rt.device, run_dir, tok_dir, metrics,
                      rank=rt.rank, world_size=rt.world_size,
                      loss_fn=lambda m, b: lm_loss(m, b, opts.z_loss))
    if state is not None:
        trainer.load_trainer_state(state)
        if (resume_ckpt / "ema.safetensors").is_file():
            trainer.load_ema(load_file(str(resume_ckpt / "ema.safetensors")))
        log.info(f"resumed from {resume_ckpt} at step {trainer.state.step}")
    if wandb_run is not None:
        trainer.state.extra["wandb_id"] = wandb_run.id
    log.info(f"model: {opts.preset}, {model.num_params() / 1e6:.2f}M params, vocab {model.config.vocab_size}; "
             f"batch {opts.batch_size}x{opts.seq_len}x{opts.grad_accum}x{rt.world_size}; {opts.max_steps} steps; "
             f"out {run_dir}")
    try:
        summary = trainer.fit()
    finally:
        metrics.close()
        loader.close()
        val.close()
        if wandb_run is not None:
            wandb_run.finish()
    if rt.is_main:
        plot_losses(run_dir)
        log.info(f"done: {summary}")
        log.info(f"chat with it: python infer/chat.py --ckpt {run_dir} --complete")
    return summary
