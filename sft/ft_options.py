"""Fine-tuning options: TrainOptions (the pretraining flags that apply) plus the few SFT/DPO flags of their own.

Kept import-light so `--help` is fast: the jobs themselves live in sft/finetune.py.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from model.errors import FurnaceError
from train.options import TrainOptions, add_arguments, options_from_args

# Learning rates for fine-tuning (pretraining's 1e-3 would wreck an SFT'd model); the rest as pretraining.
SFT_DEFAULTS = TrainOptions(lr=3e-4, min_lr=3e-5)
DPO_DEFAULTS = TrainOptions(lr=1e-4, min_lr=1e-5, schedule="constant")


@dataclass
class FinetuneOptions:
    """The flags TrainOptions does not have (saved in OUT/config.json under "finetune")."""
    kind: str = "sft"          # sft | dpo
    val_data: str = ""         # files like --data; empty = hold out a slice of --data
    skip_bad: bool = False     # skip (and count) bad records instead of stopping at the first
    truncate: bool = False     # cut over-long examples (oldest turns first) instead of treating them as bad
    beta: float = 0.1          # DPO temperature
    ref_cache: str = ""        # DPO reference log-prob cache folder; empty = runs/cache/dpo-ref

    def check(self) -> None:
        if self.kind == "dpo" and not self.beta > 0:
            raise FurnaceError(f"--beta {self.beta}: expected > 0 (e.g. 0.1)")


# A resumed run must agree on these (besides train.options.RUN_DEFINING).
RESUME_DEFINING = ("kind", "val_data", "skip_bad", "truncate", "beta")


def build_parser(kind: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, SFT_DEFAULTS if kind == "sft" else DPO_DEFAULTS)
    g = ap.add_argument_group("fine-tuning")
    g.add_argument("--val-data", default="", help="held-out files (like --data); default: every 20th example of --data")
    g.add_argument("--skip-bad", action="store_true", help="skip bad records (counted in the summary) instead of stopping")
    g.add_argument("--truncate", action="store_true",
                   help="cut examples longer than --seq-len (oldest turns first, then the end) instead of treating them as bad")
    if kind == "dpo":
        g.add_argument("--beta", type=float, default=0.1, help="DPO temperature (default: 0.1)")
        g.add_argument("--ref-cache", default="", help="reference log-prob cache folder (default: runs/cache/dpo-ref)")
    return ap


def parse(kind: str, ap: argparse.ArgumentParser, argv) -> tuple[TrainOptions, FinetuneOptions]:
    args = ap.parse_args(argv)
    opts = options_from_args(args, SFT_DEFAULTS if kind == "sft" else DPO_DEFAULTS)
    ft = FinetuneOptions(kind=kind, val_data=args.val_data, skip_bad=args.skip_bad, truncate=args.truncate,
                         beta=getattr(args, "beta", 0.1), ref_cache=getattr(args, "ref_cache", ""))
    ft.check()
    return opts, ft
