"""CPU generation speed: time to first token and decode tokens/s for our generate (fp32, bf16, int8) next to
Hugging Face transformers' generate on the same weights (exported by infer/export_hf.py), with the
memory-bandwidth bound: the best matrix-vector GB/s measured in the run (fp32, bf16 and int8 kernels over a
256 MiB matrix) / weight bytes read per token. Our rows come eager and with the compiled decode step.

    python bench/generate.py                       # presets 26m and 112m, random weights
    python bench/generate.py --presets 26m --new-tokens 32 --repeats 2
    python bench/generate.py --presets 112m --dtypes int8 --hf-dtypes "" --compile on   # the 150 tok/s target
The last stdout line is one JSON document with every number and the conditions.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from bench.generate_bench import run_bench  # noqa: E402
from kernels.common import run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="26m,112m", help="comma-separated model presets (random weights); default: 26m,112m")
    p.add_argument("--dtypes", default="fp32,bf16,int8", help="our weight dtypes to time; default: fp32,bf16,int8")
    p.add_argument("--hf-dtypes", default="fp32,bf16", help="transformers dtypes to compare ('' = skip); default: fp32,bf16")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (prefill); default: 128")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per run; default: 64")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (after one warm-up); default: 3")
    p.add_argument("--threads", type=int, default=None, help="CPU threads; default: physical cores")
    p.add_argument("--compile", default="both", choices=["both", "on", "off"],
                   help="our rows with the eager and/or the compiled decode step (infer.decode); default: both")
    return run_bench(p.parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
