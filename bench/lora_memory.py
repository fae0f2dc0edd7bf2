"""Full fine-tuning vs LoRA: trainable parameters, AdamW state bytes, peak memory of a few training steps and
checkpoint size, on random weights of a preset's shape. Each row runs in its own process.

    python bench/lora_memory.py --presets 112m,0.5b --ranks 0,8,16      # rank 0 = full fine-tuning
Steps: the optimizer of train/optim.py (AdamW, only trainable parameters), batch --batch x --seq-len random
tokens, fp32, the model's own loss. Peak memory: torch.cuda.max_memory_allocated on a GPU, the process's
resident high-water mark (VmHWM) on a CPU (everything: weights, gradients, optimizer state,
activations, the Python process itself ~0.3 GB). The last stdout line is one JSON document.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
from bench.common import finish_report, peak_rss_bytes, run_worker  # noqa: E402
from kernels.common import run_cli  # noqa: E402


def measure(preset: str, rank: int, targets: str, batch: int, seq_len: int, steps: int, device: str) -> dict:
    import tempfile

    import torch

    from model.config import get_preset
    from model.gpt import GPT
    from model.io import save
    from model.lora import LoRAConfig, apply_lora, parse_targets
    from train.optim import build_optimizer
    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = get_preset(preset)
    cfg.kernels = "torch" if dev.type == "cpu" else "auto"
    model = GPT(cfg).to(dev)
    if rank:
        apply_lora(model, LoRAConfig(rank, 2.0 * rank, 0.0, parse_targets(targets), "(random base)", ""))
    opt = build_optimizer(model, 1e-4, 0.1, dev.type)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=dev)
    for _ in range(steps):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = peak_rss_bytes()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    with tempfile.TemporaryDirectory() as d:
        save(model, d)
        ck = sum(f.stat().st_size for f in Path(d).iterdir())
    return {"preset": preset, "rank": rank, "targets": targets if rank else "all (full)",
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "optimizer_state_bytes": state, "peak_bytes": peak, "checkpoint_bytes": ck, "loss": loss.item()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="112m,0.5b",
                   help="comma-separated model presets to measure; default: 112m,0.5b")
    p.add_argument("--ranks", default="0,8,16",
                   help="comma-separated LoRA ranks; 0 = full fine-tuning; default: 0,8,16")
    p.add_argument("--targets", default="q,k,v,o",
                   help="projections that get adapters (any of q,k,v,o,gate,up,down); default: q,k,v,o")
    p.add_argument("--batch", type=int, default=1, help="sequences per training step; default: 1")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence; default: 256")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps measured per configuration; default: 2")
    p.add_argument("--device", default="cpu", help="torch device to measure on (cpu, cuda); default: cpu")
    p.add_argument("--json", help="also write the report (JSON) to this file; default: none")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        preset, rank = a.one.split(":")
        print(json.dumps(measure(preset, int(rank), a.targets, a.batch, a.seq_len, a.steps, a.device)))
        return 0
    from train.metrics import run_record
    rows = []
    for preset in a.presets.split(","):
        for rank in a.ranks.split(","):
            row, why = run_worker([__file__, "--one", f"{preset}:{rank}", "--targets", a.targets, "--batch", str(a.batch),
                                   "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--device", a.device],
                                  f"{preset} r={rank}")
            rows.append(row or {"preset": preset, "rank": int(rank), "error": why})
            print(f"{preset} r={rank}: " + (f"error {why}" if row is None else
                  f"trainable {row['trainable']:,} of {row['params']:,}; AdamW state "
                  f"{row['optimizer_state_bytes'] / 2**20:.1f} MiB; peak {row['peak_bytes'] / 2**30:.2f} GiB; "
                  f"checkpoint {row['checkpoint_bytes'] / 2**20:.1f} MiB"), file=sys.stderr)
    finish_report({"bench": "lora_memory", **run_record(a.device), "dtype": "fp32", "batch": a.batch,
                   "seq_len": a.seq_len, "steps": a.steps, "rows": rows}, a.json)
    return 0

if __name__ == "__main__":
    run_cli(main)
