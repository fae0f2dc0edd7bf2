"""Export a Furnace checkpoint as a Hugging Face LlamaForCausalLM folder (transformers, vLLM, llama.cpp).

    python infer/export_hf.py runs/sft/checkpoints/step_00001000 exported/
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('exported')"
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402

from infer.hf_export import DTYPES, export_hf  # noqa: E402
from infer.runtime import load_tokenizer_for  # noqa: E402
from kernels.common import run_cli  # noqa: E402
from model.io import load  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint folder or training run folder (newest checkpoint)")
    p.add_argument("out", help="new output folder (must not exist or be empty)")
    p.add_argument("--tokenizer", help="tokenizer.json or folder holding it (default: the checkpoint's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weight dtype in model.safetensors")
    args = p.parse_args(argv)
    tok = load_tokenizer_for(args.ckpt, args.tokenizer)
    model = load(args.ckpt)
    out = export_hf(model, args.out, tok, args.dtype)
    logging.getLogger("furnace").info(f"exported {args.ckpt} -> {out} (LlamaForCausalLM, {args.dtype})")
    return 0


if __name__ == "__main__":
    run_cli(main)
