"""Pretrain a Llama-style GPT. With no arguments: the embedded default corpus, end to end.

    python train/pretrain.py                       # tiny preset on the Python stdlib, a few minutes on CPU
    python train/pretrain.py --preset 112m --data runs/data/fineweb --fp8
    torchrun --nproc_per_node 2 train/pretrain.py --max-steps 100
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from model.errors import run_cli  # noqa: E402
from train.options import add_arguments, options_from_args  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description="Pretrain a Llama-style GPT (defaults: the embedded corpus).")
    add_arguments(ap)
    opts = options_from_args(ap.parse_args(argv))
    from train.pretraining import run
    run(opts)


if __name__ == "__main__":
    run_cli(main)
