"""Tokenize documents into llm.c-format token shards.

    python data/prepare.py                       # default corpus -> runs/data/stdlib-bpe4096
    python data/prepare.py --out runs/data/mine --source notes/ --source books.jsonl --tokenizer train:8192

With no --source (and no --hf) the embedded default corpus is used: this interpreter's standard
library .py files. See data/README.md for the output layout and the options.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from kernels.common import run_cli  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="output folder for shards, tokenizer.json and manifest.json (required with --source/--hf; "
                         "default for the embedded corpus: runs/data/stdlib-bpe4096, where training looks for it)")
    ap.add_argument("--source", action="append", default=None,
                    help="file or folder of .txt/.md/.py (one document per file), .jsonl or .parquet; repeatable. "
                         "Default: this Python's standard library sources")
    ap.add_argument("--tokenizer", default="train:4096",
                    help="train:VOCAB (byte-level BPE trained on the sources), gpt2 (tiktoken), or a "
                         "tokenizer.json / data folder / checkpoint folder (default: train:4096)")
    ap.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/--hf rows (default: text)")
    ap.add_argument("--val-fraction", type=float, default=0.01,
                    help="fraction of documents in the val split; the first document is always val (default: 0.01)")
    ap.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens in total; default: no limit")
    ap.add_argument("--max-files", type=int, default=None, help="use only the first N source files; default: all")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default: 1e8)")
    ap.add_argument("--hf", default=None, help="stream this Hugging Face dataset instead (needs network); default: none")
    ap.add_argument("--hf-config", default=None, help="--hf dataset config, e.g. sample-10BT; default: the dataset's default")
    ap.add_argument("--hf-split", default="train", help="dataset split (default: train)")
    ap.add_argument("--raw-uint16", action="store_true",
                    help="the --source files are headerless nanoGPT uint16 token files (train.bin); default: off")
    ap.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    ap.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out; default: off (refuse)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar; default: a bar on a terminal")
    args = ap.parse_args(argv)

    from data.build import DEFAULT_DATA_DIR, prepare
    from kernels.common import FurnaceError
    if args.out is None:
        if args.source or args.hf or args.tokenizer != "train:4096":
            raise FurnaceError("--out is required with --source, --hf or another --tokenizer")
        args.out = str(DEFAULT_DATA_DIR)
    prepare(args.out, sources=args.source, tokenizer=args.tokenizer, text_field=args.text_field,
            val_fraction=args.val_fraction, max_tokens=args.max_tokens, shard_tokens=args.shard_tokens,
            hf=args.hf, hf_config=args.hf_config, hf_split=args.hf_split, raw_uint16=args.raw_uint16,
            workers=args.workers, progress=not args.no_progress, max_files=args.max_files,
            overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    run_cli(main)
