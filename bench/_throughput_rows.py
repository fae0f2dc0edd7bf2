"""One row of bench/throughput.py: which (variant, precision) pairs can run here, and the measurement of one
pair in a fresh worker process.

A bench step is the trainer's own step, `train.trainer.Trainer.train_step` (forward with the fused linear +
cross-entropy loss, backward, grad-norm clip, AdamW step), on random token batches, so the numbers are what
`train/pretrain.py` gets. Each row runs in its own process: clean peak-memory figures (CUDA allocator or the
process's max RSS), no compile cache shared between rows, and a crash or OOM in one row cannot take the others
down.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import resource
import shutil
import statistics
import time

import torch

from model.config import get_preset
from kernels.common import FurnaceError
from model.flops import flops_per_token, mfu, peak_tflops
from model.gpt import GPT
from train.options import TrainOptions
from train.precision import Precision, decide_precision, resolve_device
from train.setup import Runtime, check_seq_len
from train.task import LMTask
from train.trainer import Trainer

log = logging.getLogger("furnace")

VARIANTS = ("eager", "compile", "triton", "liger")
PRECISIONS = ("bf16", "fp8-te", "fp8-torchao", "fp32")   # fp32: opt-in, not in the default list
DEFAULT_PRECISIONS = ("bf16", "fp8-te", "fp8-torchao")
KERNELS = {"eager": "torch", "compile": "torch", "triton": "triton", "liger": "liger"}  # config.kernels
LR, WEIGHT_DECAY, GRAD_CLIP = 3e-4, 0.1, 1.0


def precheck(variant: str, precision: str, device: torch.device) -> str:
    """'' when the row may run here (the worker still decides), else why it cannot. Cheap: no CUDA init."""
    reasons = []
    if variant == "triton" and device.type != "cuda":
        reasons.append("our Triton kernels need a CUDA GPU to be timed (TRITON_INTERPRET=1 runs them on CPU "
                       "for correctness only, at interpreter speed)")
    if variant == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            reasons.append("liger-kernel not installed (pip install liger-kernel)")
        elif device.type != "cuda":
            reasons.append("liger-kernel's kernels are Triton kernels and need a CUDA GPU")
    if variant == "compile" and device.type == "cpu" and not (
            os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        reasons.append("torch.compile on CPU (inductor) needs a C++ compiler and none was found (install g++)")
    if precision == "fp8-te":
        if device.type != "cuda":
            reasons.append("TransformerEngine FP8 needs a CUDA GPU with compute capability >= 8.9")
        if importlib.util.find_spec("transformer_engine") is None:
            reasons.append("TransformerEngine not installed (pip install transformer-engine[pytorch])")
    if precision == "fp8-torchao" and importlib.util.find_spec("torchao") is None:
        reasons.append("torchao not installed (pip install torchao)")
    return "; ".join(reasons)


def precision_for(name: str, device: torch.device) -> Precision:
    """The Precision train/precision.py would pick for this row; FurnaceError (-> 'unavailable') otherwise.
    FP8 rows keep BF16 autocast around the FP8 Linear layers, as training with --fp8 does."""
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FurnaceError(f"{torch.cuda.get_device_name(device)} has no BF16 support")
    if name in ("bf16", "fp32"):
        return decide_precision(device, name, fp8=False, backend="auto", strict=False)
    return decide_precision(device, "bf16", fp8=True, backend=name.split("-", 1)[1], strict=True)


class RandomBatches:
    """next_batch() -> (x, y) of uniform random token ids, (B, T) each, already on the device; a few batches
    made up front and cycled so no host-side RNG lands in the timed steps."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, device: torch.device, n: int = 4):
        g = torch.Generator().manual_seed(1234)
        toks = torch.randint(0, vocab_size, (n, batch_size, seq_len + 1), generator=g)  # (n, B, T+1)
        self.batches = [(t[:, :-1].to(device), t[:, 1:].to(device)) for t in toks]     # (B, T) each
        self.i = 0

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters  # noqa: PLC0415
    return int(sum(counters["graph_break"].values()))


def _timed_steps(trainer: Trainer, steps: int, device: torch.device) -> tuple[list[float], float, list[dict]]:
    """Per-step seconds (CUDA events on GPU, perf_counter on CPU, where every op is synchronous), the
    synchronised wall time of all timed steps, and the step outputs."""
    outs, times = [], []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    t_wall = time.perf_counter()
    for i in range(steps):
        if cuda:
            events[i][0].record()
            outs.append(trainer.train_step())
            events[i][1].record()
        else:
            t0 = time.perf_counter()
            outs.append(trainer.train_step())
            times.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t_wall
    if cuda:
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    return times, wall, outs


def measure(spec: dict) -> dict:
    """Run one row in this process. spec: variant, precision, preset, batch_size, seq_len, warmup, steps,
    device. Returns the row: status ok | unavailable (a FurnaceError: the combination cannot run here) |
    error (anything else, with its message); numbers only for ok rows."""
    row = {"variant": spec["variant"], "precision": spec["precision"], "status": "error", "reason": None}
    try:
        row.update(_measure(spec))
        row["status"] = "ok"
    except FurnaceError as e:
        row.update(status="unavailable", reason=str(e))
    except torch.cuda.OutOfMemoryError as e:
        row["reason"] = f"CUDA out of memory ({str(e).splitlines()[0][:160]}); lower --batch-size"
    except Exception as e:  # a failed row is reported as such, with its error; the other rows still run
        log.exception(f"{spec['variant']}/{spec['precision']} failed")
        row["reason"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return row


def _measure(spec: dict) -> dict:
    variant, precision = spec["variant"], spec["precision"]
    B, T, device = spec["batch_size"], spec["seq_len"], resolve_device(spec["device"])
    why = precheck(variant, precision, device)
    if why:
        raise FurnaceError(why)
    torch.manual_seed(0)
    cfg = get_preset(spec["preset"]).replace(kernels=KERNELS[variant])
    check_seq_len(T, cfg, spec["preset"])
    prec = precision_for(precision, device)
    cuda = device.type == "cuda"
    if cuda:
        if device.index is not None:               # CUDA events record on the current device's stream
            torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
        mem_base = torch.cuda.memory_allocated(device)
    else:
        rss_base, max_rss_base = _rss_bytes(), _max_rss_bytes()

    model = GPT(cfg).to(device)
    opts = TrainOptions(max_steps=spec["warmup"] + spec["steps"], lr=LR, min_lr=LR, schedule="constant", warmup=1,
                        grad_clip=GRAD_CLIP, weight_decay=WEIGHT_DECAY, compile=variant == "compile")
    # The Trainer converts the FP8 layers, compiles and builds AdamW as for a run; the bench never saves.
    trainer = Trainer(opts, LMTask(RandomBatches(cfg.vocab_size, B, T, device)), model, Runtime(device, precision=prec))
    t0 = time.perf_counter()
    warm = [trainer.train_step() for _ in range(spec["warmup"])]
    warmup_s = time.perf_counter() - t0
    times, wall, outs = _timed_steps(trainer, spec["steps"], device)

    skipped = sum(o["skipped"] for o in warm + outs)
    if skipped:
        raise RuntimeError(f"{skipped} of {len(warm) + len(outs)} steps had a non-finite loss or gradient")
    tokens = outs[0]["n_tokens"]                                   # B * T: random targets, none ignored
    med = statistics.median(times)
    tps = tokens / med
    res = {
        "tokens_per_s": tps,
        "tokens_per_s_wall": tokens * len(times) / wall,           # cross-check of the per-step timer
        "step_ms_median": 1e3 * med, "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
        "step_ms_stdev": 1e3 * statistics.stdev(times) if len(times) > 1 else 0.0,
        "spread_pct": 100 * (max(times) - min(times)) / med,
        "tokens_per_step": tokens, "warmup_s": warmup_s,
        "loss_first": warm[0]["loss"] if warm else outs[0]["loss"], "loss_last": outs[-1]["loss"],
        "kernels": cfg.kernels, "compiled": variant == "compile",
        "ran_as": _ran_as(prec, device),
    }
    if variant == "compile":
        res["graph_breaks"] = _graph_breaks()
    res.update(_mfu_fields(cfg, T, tps, prec, device))
    if cuda:
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - mem_base
        res["peak_mem_kind"] = "torch.cuda.max_memory_allocated (model, optimizer state, activations, workspace)"
    elif _max_rss_bytes() > max_rss_base:
        res["peak_mem_bytes"] = _max_rss_bytes() - rss_base
        res["peak_mem_kind"] = ("CPU: peak RSS of the row's process minus its RSS just before the model was built "
                                "(model, optimizer state, activations, compile workspace)")
    else:
        res["peak_mem_bytes"] = None
        res["peak_mem_kind"] = "CPU: the run never raised the process's earlier RSS high-water mark; not measurable"
    return res


def _ran_as(prec: Precision, device: torch.device) -> str:
    """What really ran, in words: autocast dtype on which device, and how many Linear layers went FP8."""
    amp = ("fp32, no autocast" if prec.dtype == torch.float32 else
           f"{'bf16' if prec.dtype == torch.bfloat16 else 'fp16'} autocast on {device.type.upper()}")
    if not prec.fp8:
        return amp
    backend = "TransformerEngine" if prec.fp8 == "te" else "torchao float8 (dynamic tensorwise)"
    return f"{backend} on {len(prec.converted)} block Linear layers, {amp}; embeddings, LM head, norms, loss not FP8"


def _mfu_fields(cfg, seq_len: int, tps: float, prec: Precision, device: torch.device) -> dict:
    fpt = flops_per_token(cfg, seq_len)
    if device.type != "cuda":
        return {"mfu": None, "mfu_fp8_peak": None,
                "mfu_note": "no peak FLOP/s for CPUs in model/flops.PEAK_TFLOPS: MFU not reported"}
    name = torch.cuda.get_device_name(device)
    bf16, fp8 = peak_tflops(name, "bf16"), peak_tflops(name, "fp8")
    if bf16 is None:
        return {"mfu": None, "mfu_fp8_peak": None,
                "mfu_note": f"{name!r} has no row in model/flops.PEAK_TFLOPS: MFU not reported"}
    if prec.fp8 and fp8:
        out = {"mfu_fp8_peak": mfu(fpt, tps, fp8), "mfu": mfu(fpt, tps, bf16, limit=fp8 / bf16)}
    else:
        out = {"mfu": mfu(fpt, tps, bf16), "mfu_fp8_peak": None}
    out["mfu_note"] = f"vs dense BF16 peak {bf16} TFLOP/s" + (f"; FP8 rows also vs dense FP8 peak {fp8}" if fp8 else "")
    return out
