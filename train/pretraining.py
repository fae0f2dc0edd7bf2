"""The pretraining job behind `python train/pretrain.py`: resolve defaults, prepare the embedded corpus
when needed, build or resume the model, and run the shared loop."""
from __future__ import annotations

import logging
from pathlib import Path

from data import TokenLoader, check_tokenizer_match, load_tokenizer, parse_data_arg, prepare
from data.build import DEFAULT_DATA_DIR as DEFAULT_DATA
from model.config import get_preset
from model.errors import FurnaceError
from model.io import resolve_checkpoint
from train.checkpoint import check_out_dir
from train.loop import lm_loss
from train.options import RUN_DEFINING, TrainOptions
from train.runner import run_loop
from train.setup import (Runtime, build_model, check_seq_len, default_out, latest_default_out, with_runtime,
                         pad_vocab)

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
    if rt.is_main and not (DEFAULT_DATA / "manifest.json").is_file():
        log.info(f"data: preparing the embedded default corpus (Python standard library) in {DEFAULT_DATA}")
        prepare(DEFAULT_DATA)
    rt.barrier()  # on every rank: one that found rank 0's fresh manifest must not skip it (collectives pair up)
    opts.data = str(DEFAULT_DATA)
    return [(str(DEFAULT_DATA), 1.0)]


def run(opts: TrainOptions) -> dict:
    return with_runtime(_run, opts)


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

    # --eval-tokens, but never more than one pass over the validation split
    eval_batches = max(1, min(opts.eval_tokens // (opts.batch_size * opts.seq_len), val.batches_per_epoch))
    log.info(f"model: {opts.preset}, {model.num_params() / 1e6:.2f}M params, vocab {model.config.vocab_size}; "
             f"batch {opts.batch_size}x{opts.seq_len}x{opts.grad_accum}x{rt.world_size}; {opts.max_steps} steps; "
             f"out {run_dir}")
    try:
        summary = run_loop(opts, rt, model, run_dir, resume_ckpt, loader, val, tok_dir, seq_len=opts.seq_len,
                           eval_batches=eval_batches, run_record={"data": sources},
                           loss_fn=lambda m, b: lm_loss(m, b, opts.z_loss))
    finally:
        loader.close()
        val.close()
    if rt.is_main:
        log.info(f"chat with it: python infer/chat.py --ckpt {run_dir} --complete")
    return summary
