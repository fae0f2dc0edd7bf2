"""Supervised fine-tuning (assistant-only loss, packed examples) of a pretrained Furnace model.

    python sft/train_sft.py --init runs/tiny-stdlib-bpe4096                  # offline default dataset
    python sft/train_sft.py --init runs/base --data chat.jsonl,alpaca.jsonl --out runs/sft --max-steps 2000
    python sft/train_sft.py --init runs/base --data hf:HuggingFaceH4/ultrachat_200k:train_sft   # online
Formats, template, masking and the truncation policy: sft/README.md.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging  # noqa: E402

from kernels.common import run_cli  # noqa: E402
from sft.common import parse, run  # noqa: E402

log = logging.getLogger("furnace")


def main(argv=None):
    opts, ft, _ = parse("sft", __doc__, argv)
    return run(opts, ft, sft_task)


def sft_task(opts, ft, rt, job):
    """Packed examples (document masking) with the language-modelling task; the loss unit is a trained
    (assistant) token, so tokens and tokens/s count those and MFU is corrected for it."""
    from model.flops import flops_per_token
    from sft.common import read_data, set_max_steps
    from sft.examples import build_sft_example
    from sft.formats import sft_messages
    from sft.packing import PackedSFTLoader
    from train.trainer import eval_batches
    from train.task import LMTask

    train, val, record = read_data(opts, ft, job, sft_messages,
                                   lambda msgs: build_sft_example(job.tok, msgs, opts.seq_len, ft.truncate), rt.rank)
    pad = job.tok.eos_id
    loader = PackedSFTLoader(train, opts.batch_size, opts.seq_len, pad, seed=opts.seed, rank=rt.rank,
                             world_size=rt.world_size, device=rt.device)
    st = loader.stats()
    set_max_steps(opts, rt.world_size, st["rows"])
    val_loader = PackedSFTLoader(val, opts.batch_size, opts.seq_len, pad, shuffle=False, device=rt.device) if val else None
    step_tokens = opts.batch_size * opts.seq_len * opts.grad_accum * rt.world_size
    in_run, final = eval_batches(opts, step_tokens, val_loader.batches_per_epoch()) if val_loader else (1, 1)
    log.info(f"SFT: {len(train)} train / {len(val)} val examples; {st['rows']} packed rows of {opts.seq_len} per "
             f"epoch ({100 * st['fill']:.0f}% filled, {st['trained_per_row']:.0f} trained tokens per row); "
             f"batch {opts.batch_size}x{opts.seq_len}x{opts.grad_accum}x{rt.world_size}; {opts.max_steps} steps; "
             f"out {job.run_dir}")
    log.info("SFT: the loop's tokens and tokens/s count trained (assistant) tokens, the loss's normaliser")
    fpu = flops_per_token(job.model.config, opts.seq_len) * opts.seq_len / max(st["trained_per_row"], 1.0)
    task = LMTask(loader, val_loader, final, opts.z_loss, fpu)
    task.in_run_batches = in_run
    return task, record


if __name__ == "__main__":
    run_cli(main)
