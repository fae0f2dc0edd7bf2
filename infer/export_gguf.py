"""Export a Furnace checkpoint as a llama.cpp GGUF file, with an Ollama Modelfile beside it.

    python infer/export_gguf.py runs/sft out/furnace.gguf --type q8_0   # also writes out/furnace.Modelfile
    ollama create furnace -f out/furnace.Modelfile && ollama run furnace
    python -c "from llama_cpp import Llama; print(Llama('out/furnace.gguf')('def f(', max_tokens=20))"
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402

from kernels.common import FurnaceError, run_cli  # noqa: E402


def main(argv=None):
    from data.tokenizer import load_tokenizer
    from infer.gguf_file import TYPES, modelfile_text, write_gguf
    from model.fileio import atomic_write
    from model.io import load, resolve_checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint folder or training run folder (newest checkpoint)")
    p.add_argument("out", help="new .gguf file (never overwritten); OUT without .gguf + .Modelfile is written beside")
    p.add_argument("--type", choices=TYPES, default="f16", help="matrix weight type (norms stay f32); default: f16")
    p.add_argument("--tokenizer", help="tokenizer.json or folder holding it (default: the checkpoint's)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".gguf":
        raise FurnaceError(f"OUT {out}: expected a file name ending in .gguf")
    modelfile = out.with_suffix(".Modelfile")
    if modelfile.exists():
        raise FurnaceError(f"{modelfile} already exists; choose another OUT name (existing files are never "
                           f"overwritten)")
    if not out.parent.is_dir():
        raise FurnaceError(f"OUT {out}: folder {out.parent} does not exist")
    tok = load_tokenizer(args.tokenizer or resolve_checkpoint(args.ckpt))
    model = load(args.ckpt)
    write_gguf(model, tok, out, args.type, name=resolve_checkpoint(args.ckpt).name)
    atomic_write(modelfile, modelfile_text(out.name, tok, model.config.max_seq_len))
    logging.getLogger("furnace").info(f"exported {args.ckpt} -> {out} ({args.type}) and {modelfile}")
    return 0


if __name__ == "__main__":
    run_cli(main)
