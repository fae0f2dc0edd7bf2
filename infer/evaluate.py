"""Evaluate a Furnace checkpoint with EleutherAI lm-eval, and/or its perplexity on validation shards.

    python infer/evaluate.py --ckpt runs/base --tasks hellaswag,arc_easy --batch-size 8
    python infer/evaluate.py --ckpt runs/base --tasks my_task --include-path tasks/ --offline
    python infer/evaluate.py --ckpt runs/base --ppl data/stdlib
Results (with lm-eval's task versions, shots, batch size, chat-template use) go to stdout as JSON on
the last line and to --output when given. Offline use: see infer/README.md.
"""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# This script's folder must not stay on sys.path: lm-eval task code does `import evaluate` (the Hugging
# Face package) and would get this file instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402

from infer.eval_run import run_evaluation  # noqa: E402
from kernels.common import run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder or training run folder (newest checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer.json or folder holding it (default: the checkpoint's)")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="folder of extra task YAMLs (local tasks)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction if < 1)")
    p.add_argument("--apply-chat-template", action="store_true", help="format prompts with the chat template")
    p.add_argument("--offline", action="store_true",
                   help="never reach the Hugging Face hub (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1)")
    p.add_argument("--ppl", metavar="DATA_DIR", help="also report perplexity on this data folder's val shards")
    p.add_argument("--ppl-seq-len", type=int, default=None, help="window for --ppl (default: the model's context)")
    p.add_argument("--ppl-max-tokens", type=int, default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", help="also write the results JSON here (refuses to overwrite)")
    return run_evaluation(p.parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
