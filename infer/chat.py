"""Terminal chat (and plain completion) with a Furnace checkpoint, CPU by default.

    python infer/chat.py --ckpt runs/sft                      # interactive; /reset, /exit, Ctrl-D
    python infer/chat.py --ckpt runs/sft --prompt "Hi"        # answer once and exit
    python infer/chat.py --ckpt runs/base --complete --prompt "def fib(n):"
    python infer/chat.py --ckpt runs/sft --compile off        # start at once, decode in eager mode
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from infer.repl import run_chat  # noqa: E402
from kernels.common import run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder or training run folder (newest checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer.json or folder holding it (default: the checkpoint's)")
    p.add_argument("--system", help="system message for chat mode")
    p.add_argument("--prompt", help="answer this one message (or complete this text with --complete) and exit")
    p.add_argument("--complete", action="store_true", help="plain continuation, no chat template (pretrain-only checkpoints)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                   help="auto = int8 on CPU, bf16 on CUDA")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compile the CPU decode step (~1.5x faster decode; the first start compiles for 30-45 s, "
                        "later ones ~10 s). auto = on for models of >= 20M matmul parameters")
    return run_chat(p.parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
