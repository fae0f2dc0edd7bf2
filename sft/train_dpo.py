"""Direct Preference Optimization of an SFT'd Furnace model, with cached reference log-probs.

    python sft/train_dpo.py --init runs/sft-tiny-stdlib-bpe4096                 # offline default pairs
    python sft/train_dpo.py --init runs/sft --data prefs.jsonl --out runs/dpo --beta 0.1
Formats ({"chosen", "rejected"} message lists or TRL {"prompt", "chosen", "rejected"}): sft/README.md.
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
    opts, ft, _ = parse("dpo", __doc__, argv)
    return run(opts, ft, dpo_task)


def dpo_task(opts, ft, rt, job):
    """Preference pairs with the DPO task. The reference log-probs come from the model as it is here (the
    frozen --init model: resume weights are loaded later, by the Trainer; with LoRA, the same model with its
    adapters off: no second copy of the weights), cached on disk."""
    import hashlib
    import json

    from model.flops import flops_per_token
    from model.fileio import sha256_file
    from model.io import weights_file
    from model.lora import adapters_disabled
    from sft.common import read_data, set_max_steps
    from sft.dpo import DPOTask, PairLoader, cached_reference_logps, reference_logps
    from sft.examples import build_sft_example
    from sft.formats import dpo_messages

    def build(pair):
        return tuple(build_sft_example(job.tok, msgs, opts.seq_len, ft.truncate, last_only=True) for msgs in pair)

    def reference():
        with adapters_disabled(model):
            return reference_logps(model, train + val, opts.batch_size, pad, opts.seq_len, rt.device,
                                   rt.precision.autocast)

    train, val, record = read_data(opts, ft, job, dpo_messages, build, rt.rank)
    pad, model = job.tok.eos_id, job.model
    key = hashlib.sha256()  # what the reference log-probs depend on besides the data
    for part in (sha256_file(weights_file(job.init_ckpt)), job.tok.sha256,
                 json.dumps(model.config.to_dict(), sort_keys=True), rt.precision.name):
        key.update(part.encode())
    ref = cached_reference_logps(Path(ft.ref_cache or "runs/cache/dpo-ref"), key.hexdigest(), train + val, reference)
    loader = PairLoader(train, ref[:len(train)], opts.batch_size, pad, opts.seq_len, seed=opts.seed, rank=rt.rank,
                        world_size=rt.world_size, device=rt.device)
    set_max_steps(opts, rt.world_size, len(train))
    mean_len = sum(len(c[0]) + len(r[0]) for c, r in train) / len(train)
    log.info(f"DPO: {len(train)} train / {len(val)} held-out pairs, beta {ft.beta}; batch {opts.batch_size} pairs x "
             f"{opts.grad_accum} x {rt.world_size}; {opts.max_steps} steps; out {job.run_dir}")
    log.info("DPO: the loop counts preference pairs (the loss unit: pair/s on the console; tokens and tokens_per_s "
             "in metrics.jsonl); loss starts at ln 2 = 0.6931")
    task = DPOTask(loader, ft.beta, val, ref[len(train):], flops_per_token(model.config, opts.seq_len) * mean_len,
                   rt.device, rt.precision.autocast)
    return task, record


if __name__ == "__main__":
    run_cli(main)
