"""Direct Preference Optimization of an SFT'd Furnace model, with cached reference log-probs.

    python sft/train_dpo.py --init runs/sft-tiny-stdlib-bpe4096                 # offline default pairs
    python sft/train_dpo.py --init runs/sft --data prefs.jsonl --out runs/dpo --beta 0.1
Formats ({"chosen", "rejected"} message lists or TRL {"prompt", "chosen", "rejected"}): sft/README.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.errors import run_cli  # noqa: E402
from sft.ft_options import build_parser, parse  # noqa: E402


def main(argv=None):
    opts, ft = parse("dpo", build_parser("dpo", __doc__), argv)
    from sft.finetune import run_dpo
    run_dpo(opts, ft)


if __name__ == "__main__":
    run_cli(main)
