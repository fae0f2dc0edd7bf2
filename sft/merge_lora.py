"""Fold a LoRA adapter run into a full checkpoint that every command opens (chat, evaluate, export, --init).

    python sft/merge_lora.py runs/sft-lora runs/sft-lora-merged     # newest checkpoint of the run
    python sft/train_sft.py --init runs/base --lora-rank 8 --merge    # the same, at the end of training
The adapter checkpoint names its base (path and sha256); the base must be where it was and unchanged.
The output holds config.json, model.safetensors (W + B @ A * alpha / r in fp32, then the base's dtype) and
the run's tokenizer and chat template.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402

from kernels.common import FurnaceError, run_cli  # noqa: E402

log = logging.getLogger("furnace")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_meta.json", "chat_template.json")
DTYPES = {"base": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def merge_checkpoint(ckpt, out, dtype: str = "base") -> Path:
    """Write the merged full checkpoint of adapter checkpoint (or run) `ckpt` into the new folder `out`,
    atomically (model.fileio.atomic_dir); `dtype` (DTYPES) casts the merged weights, "base": the base's dtype."""
    import shutil

    from model.fileio import atomic_dir
    from model.io import load, resolve_checkpoint, save
    from model.lora import is_adapter_checkpoint
    src = resolve_checkpoint(ckpt)
    if not is_adapter_checkpoint(src):
        raise FurnaceError(f"merge: {src} is not a LoRA adapter checkpoint (no adapter_config.json); it is already "
                           f"a full checkpoint")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FurnaceError(f"merge: output {out} already exists and is not empty; choose a new folder")
    model = load(src)                                   # base (hash-checked) + adapters, merged
    if DTYPES[dtype]:
        import torch
        model = model.to(getattr(torch, DTYPES[dtype]))
    with atomic_dir(out) as tmp:
        save(model, tmp)
        for name in (n for n in TOKENIZER_FILES if (src / n).is_file()):
            shutil.copy2(src / name, tmp / name)
    return out


def main(argv=None):
    from kernels.common import EXIT_CODES
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=EXIT_CODES)
    p.add_argument("ckpt", help="adapter checkpoint folder or LoRA training run folder (newest checkpoint)")
    p.add_argument("out", help="new output folder (must not exist or be empty)")
    p.add_argument("--dtype", choices=list(DTYPES), default="base",
                   help="precision of the merged weights (merging itself is done in fp32); base = the base "
                        "checkpoint's own dtype; default: base")
    args = p.parse_args(argv)
    log.info(f"merged {args.ckpt} -> {merge_checkpoint(args.ckpt, args.out, args.dtype)}")


if __name__ == "__main__":
    run_cli(main)
