"""Supervised fine-tuning (assistant-only loss, packed examples) of a pretrained Furnace model.

    python sft/train_sft.py --init runs/tiny-stdlib-bpe4096                  # offline default dataset
    python sft/train_sft.py --init runs/base --data chat.jsonl,alpaca.jsonl --out runs/sft --max-steps 2000
    python sft/train_sft.py --init runs/base --data hf:HuggingFaceH4/ultrachat_200k:train_sft   # online
Formats, template, masking and the truncation policy: sft/README.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.errors import run_cli  # noqa: E402
from sft.ft_options import build_parser, parse  # noqa: E402


def main(argv=None):
    opts, ft = parse("sft", build_parser("sft", __doc__), argv)
    from sft.finetune import run_sft
    run_sft(opts, ft)


if __name__ == "__main__":
    run_cli(main)
