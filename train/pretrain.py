"""Pretrain a Llama-style GPT. With no arguments: the embedded default corpus, end to end.

    python train/pretrain.py                       # tiny preset on the Python stdlib, a few minutes on CPU
    python train/pretrain.py --preset 112m --data runs/data/fineweb --fp8
    torchrun --nproc_per_node 2 train/pretrain.py --max-steps 100
The job: resolve the device's defaults, prepare the embedded corpus when needed, build (or --init) the
model, and hand it with a language-modelling task (train/task.py) to the Trainer (train/trainer.py).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402

from kernels.common import EXIT_CODES, EXIT_INTERRUPTED, FurnaceError, run_cli  # noqa: E402
from train.options import TrainOptions, add_arguments, options_from_args  # noqa: E402

log = logging.getLogger("furnace")
CPU_DEFAULTS = dict(preset="tiny", batch_size=8, seq_len=256, max_steps=300)
GPU_DEFAULTS = dict(preset="26m", batch_size=32, seq_len=1024, max_steps=2000)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Pretrain a Llama-style GPT (defaults: the embedded corpus).",
                                 epilog=EXIT_CODES)
    add_arguments(ap)
    summary = run(options_from_args(ap.parse_args(argv)))
    return EXIT_INTERRUPTED if summary.get("interrupted") else 0


def run(opts: TrainOptions) -> dict:
    from train.setup import init_runtime
    with init_runtime(opts) as rt:
        trainer, record = build(opts, rt)
        try:
            summary = trainer.run(record)
        finally:
            trainer.task.train_loader.close()
            trainer.task.val_loader.close()
        if rt.is_main and not summary.get("interrupted"):
            log.info(f"next: python sft/train_sft.py --init {opts.out}   (or try it: python infer/chat.py "
                     f"--ckpt {opts.out} --complete)")
        return summary


def build(opts: TrainOptions, rt, make_task=None):
    """-> (Trainer, run record): defaults resolved into `opts`, data, model (fresh, --init or --resume).
    `make_task(loader, val, eval_batches, model, data_dir) -> task` replaces the language-modelling task
    (sft/train_distill.py trains on the same shards with its own loss)."""
    from data import TokenLoader, check_tokenizer_match, load_tokenizer
    from model.config import get_preset
    from model.flops import flops_per_token
    from model.io import resolve_checkpoint
    from train.setup import build_model, check_seq_len, open_run_dir
    from train.task import LMTask
    from train.trainer import Trainer, eval_batches

    step_tokens = resolve_defaults(opts, rt)
    sources = ensure_data(opts, rt)
    run_dir, resume_ckpt = open_run_dir(opts, f"{opts.preset}-{Path(sources[0][0]).name}")

    loader = TokenLoader(sources, opts.batch_size, opts.seq_len, split="train", seed=opts.seed,
                         rank=rt.rank, world_size=rt.world_size, device=rt.device)
    val = TokenLoader(sources, opts.batch_size, opts.seq_len, split="val", mode="sequential", device=rt.device)
    cfg = get_preset(opts.preset)
    if loader.vocab_size is not None:
        cfg.vocab_size = -(-loader.vocab_size // 64) * 64  # padded up to a multiple of 64
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
    if loader.vocab_size is not None and loader.vocab_size > model.config.vocab_size:
        raise FurnaceError(f"--init model has vocab {model.config.vocab_size} < the data tokenizer's {loader.vocab_size}")

    in_run, final = eval_batches(opts, step_tokens, val.batches_per_epoch)
    log.info(f"model: {opts.preset}, {model.num_params() / 1e6:.2f}M params, vocab {model.config.vocab_size}; "
             f"batch {opts.batch_size}x{opts.seq_len}x{opts.grad_accum}x{rt.world_size}; {opts.max_steps} steps; "
             f"out {run_dir}")
    task = (make_task(loader, val, final, model, Path(sources[0][0])) if make_task else
            LMTask(loader, val, final, opts.z_loss, flops_per_token(model.config, opts.seq_len)))
    task.in_run_batches, task.sample = in_run, make_sampler(opts, sources[0][0], val)
    trainer = Trainer(opts, task, model, rt, run_dir, resume=resume_ckpt, tokenizer_dir=Path(sources[0][0]))
    return trainer, {"data": sources}


def make_sampler(opts: TrainOptions, data_dir: str, val):
    """The fixed prompt continued at each evaluation: --sample-prompt, else the first 16 tokens of the
    validation split. None with --sample-prompt none or without a tokenizer."""
    from data import load_tokenizer
    from infer.generation import PromptSampler
    if opts.sample_prompt == "none" or not (Path(data_dir) / "tokenizer.json").is_file():
        return None
    tok = load_tokenizer(data_dir)
    if opts.sample_prompt:
        ids = tok.encode(opts.sample_prompt) or [tok.eos_id]
    else:
        val.reset()
        ids = val.next_batch()[0][0, :16].tolist()  # (B, T) -> the first window's first tokens
        val.reset()
    return PromptSampler(tok, ids, stop_ids=(tok.eos_id,))


def resolve_defaults(opts: TrainOptions, rt) -> int:
    """Fill the options left at 0/'' with the device's defaults, in place (so config.json is concrete);
    returns the tokens per optimizer step."""
    from model.config import get_preset
    d = GPU_DEFAULTS if rt.device.type == "cuda" else CPU_DEFAULTS
    opts.preset = opts.preset or d["preset"]
    opts.batch_size = opts.batch_size or d["batch_size"]
    opts.seq_len = opts.seq_len or min(d["seq_len"], get_preset(opts.preset).max_seq_len)
    per_step = opts.batch_size * opts.seq_len * opts.grad_accum * rt.world_size
    opts.max_steps = opts.max_steps or (-(-opts.tokens // per_step) if opts.tokens else d["max_steps"])
    return per_step


def ensure_data(opts: TrainOptions, rt) -> list[tuple[str, float]]:
    """--data sources, or the embedded default corpus (prepared once, by rank 0)."""
    from data import parse_data_arg, prepare
    from data.build import DEFAULT_DATA_DIR
    if not opts.data:
        if rt.is_main and not (DEFAULT_DATA_DIR / "manifest.json").is_file():
            log.info(f"data: preparing the embedded default corpus (Python standard library) in {DEFAULT_DATA_DIR}")
            prepare(DEFAULT_DATA_DIR)
        rt.barrier()  # on every rank: one that found rank 0's fresh manifest must not skip it (collectives pair up)
        opts.data = str(DEFAULT_DATA_DIR)
    sources = parse_data_arg(opts.data)
    for d, _ in sources:
        if not Path(d).is_dir():
            raise FurnaceError(f"--data {d}: no such folder (make one with: python data/prepare.py --out {d} ...)")
    return sources

if __name__ == "__main__":
    run_cli(main)
