"""End-to-end training throughput: real training steps (forward, backward, AdamW) of a preset for each kernel
variant (eager PyTorch, torch.compile, our Triton kernels, Liger) and precision (BF16, FP8 via TransformerEngine,
FP8 via torchao), as tokens/s, MFU, peak memory and speed-up over eager BF16. Combinations that cannot run here
are rows with status "unavailable" and the reason. The last stdout line is the whole report as one JSON document.
Columns and sources: bench/README.md.

    python bench/throughput.py                                  # 112m on a GPU, tiny on a CPU
    python bench/throughput.py --variants eager,triton --precisions bf16,fp8-te --json out.json --plot out.png
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402

from bench._throughput_report import (build_report, check_out_path, conditions, config_block,  # noqa: E402
                                      format_table, parse_list, run_rows, write_json, write_plot)
from bench._throughput_rows import DEFAULT_PRECISIONS, PRECISIONS, VARIANTS, measure  # noqa: E402
from model.config import get_preset  # noqa: E402
from kernels.common import FurnaceError, run_cli  # noqa: E402
from train.precision import resolve_device  # noqa: E402
from train.setup import check_seq_len  # noqa: E402

# Per device type: preset, batch size, seq len (capped at the preset's context), warm-up steps, timed steps.
DEFAULTS = {"cuda": ("112m", 16, 2048, 5, 20), "cpu": ("tiny", 4, 128, 3, 8)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="", help="model preset (default: 112m on a GPU, tiny on a CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}; default: all")
    p.add_argument("--precisions", default=",".join(DEFAULT_PRECISIONS),
                   help=f"comma-separated subset of {','.join(PRECISIONS)}; default: {','.join(DEFAULT_PRECISIONS)} (fp32 only on request)")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per step (default: 16 GPU, 4 CPU)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: 2048 GPU, 128 CPU, "
                   "capped at the preset's context)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per row (default: 20 GPU, 8 CPU)")
    p.add_argument("--warmup", type=int, default=-1, help="untimed warm-up steps per row, compile included "
                   "(default: 5 GPU, 3 CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N; default: auto (CUDA when present)")
    p.add_argument("--json", default="", help="also write the report to this JSON file; default: none")
    p.add_argument("--plot", default="", help="write a PNG bar chart of tokens/s to this file; default: none")
    p.add_argument("--worker", help=argparse.SUPPRESS)   # internal: measure one row (JSON spec) in this process
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0

    device = resolve_device(args.device)
    preset, batch, seq, warmup, steps = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    preset = args.preset or preset
    cfg = get_preset(preset)
    batch = args.batch_size or batch
    seq = args.seq_len or min(seq, cfg.max_seq_len)
    steps = args.steps or steps
    warmup = warmup if args.warmup < 0 else args.warmup
    for flag, v, lo in (("--batch-size", batch, 1), ("--seq-len", seq, 1), ("--steps", steps, 1)):
        if v < lo:
            raise FurnaceError(f"{flag} {v}: expected an integer >= {lo}")
    check_seq_len(seq, cfg, preset)
    variants = parse_list(args.variants, VARIANTS, "--variants")
    precisions = parse_list(args.precisions, PRECISIONS, "--precisions")
    json_path, plot_path = check_out_path(args.json, "--json"), check_out_path(args.plot, "--plot")

    cond = conditions(device)
    specs = [dict(variant=v, precision=pr, preset=preset, batch_size=batch, seq_len=seq, warmup=warmup,
                  steps=steps, device=str(device)) for v in variants for pr in precisions]
    rows = run_rows(specs, [sys.executable, str(Path(__file__).resolve()), "--worker"])
    report = build_report(device, config_block(preset, batch, seq, warmup, steps, device), rows, cond)
    if json_path:
        write_json(json_path, report)
    if plot_path:
        write_plot(plot_path, report)
    print(format_table(report))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    run_cli(main)
