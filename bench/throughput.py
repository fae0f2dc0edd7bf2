"""End-to-end training throughput: real training steps (forward, backward, AdamW) of a preset for each kernel
variant (eager PyTorch, torch.compile, our Triton kernels, Liger) and precision (BF16, FP8 via TransformerEngine,
FP8 via torchao), as tokens/s, MFU, peak memory and speed-up over eager BF16. Combinations that cannot run here
are rows with status "unavailable" and the reason. The last stdout line is the whole report as one JSON document.
Columns and sources: bench/README.md.

    python bench/throughput.py                                  # 112m on a GPU, tiny on a CPU
    python bench/throughput.py --variants eager,triton --precisions bf16,fp8-te --json out.json --plot out.png

A bench step is the trainer's own step, `train.trainer.Trainer.train_step` (forward with the fused linear +
cross-entropy loss, backward, grad-norm clip, AdamW step), on random token batches, so the numbers are what
`train/pretrain.py` gets. Each row runs in its own process (this file with --worker): clean peak-memory figures
(CUDA allocator or the process's max RSS), no compile cache shared between rows, and a crash or OOM in one row
cannot take the others down.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from bench.common import finish_report, peak_rss_bytes, rss_bytes, run_worker  # noqa: E402
from kernels.common import FurnaceError, run_cli  # noqa: E402

log = logging.getLogger("furnace")
VARIANTS = ("eager", "compile", "triton", "liger")
PRECISIONS = ("bf16", "fp8-te", "fp8-torchao", "fp32")   # fp32: opt-in, not in the default list
DEFAULT_PRECISIONS = ("bf16", "fp8-te", "fp8-torchao")
KERNELS = {"eager": "torch", "compile": "torch", "triton": "triton", "liger": "liger"}  # config.kernels
LR, WEIGHT_DECAY, GRAD_CLIP = 3e-4, 0.1, 1.0
# Per device type: preset, batch size, seq len (capped at the preset's context), warm-up steps, timed steps.
DEFAULTS = {"cuda": ("112m", 16, 2048, 5, 20), "cpu": ("tiny", 4, 128, 3, 8)}
ROW_TIMEOUT_S = 1800
# Every row carries these keys; rows that did not run keep them null (no made-up numbers).
NUMBERS = ("tokens_per_s", "tokens_per_s_wall", "step_ms_median", "step_ms_min", "step_ms_max", "step_ms_stdev",
           "spread_pct", "mfu", "mfu_fp8_peak", "peak_mem_bytes", "speedup_vs_eager_bf16")


# ----------------------------------------------------------------------------- one row (worker process)
def precheck(variant: str, precision: str, device) -> str:
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


def precision_for(name: str, device):
    """The Precision train/precision.py would pick for this row; FurnaceError (-> 'unavailable') otherwise.
    FP8 rows keep BF16 autocast around the FP8 Linear layers, as training with --fp8 does."""
    import torch  # noqa: PLC0415

    from train.precision import decide_precision  # noqa: PLC0415
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FurnaceError(f"{torch.cuda.get_device_name(device)} has no BF16 support")
    if name in ("bf16", "fp32"):
        return decide_precision(device, name, fp8=False, backend="auto", strict=False)
    return decide_precision(device, "bf16", fp8=True, backend=name.split("-", 1)[1], strict=True)


class RandomBatches:
    """next_batch() -> (x, y) of uniform random token ids, (B, T) each, already on the device; a few batches
    made up front and cycled so no host-side RNG lands in the timed steps."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, device, n: int = 4):
        import torch  # noqa: PLC0415
        g = torch.Generator().manual_seed(1234)
        toks = torch.randint(0, vocab_size, (n, batch_size, seq_len + 1), generator=g)  # (n, B, T+1)
        self.batches = [(t[:, :-1].to(device), t[:, 1:].to(device)) for t in toks]     # (B, T) each
        self.i = 0

    def next_batch(self):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]


def _timed_steps(trainer, steps: int, device) -> tuple[list[float], float, list[dict]]:
    """Per-step seconds (CUDA events on GPU, perf_counter on CPU, where every op is synchronous), the
    synchronised wall time of all timed steps, and the step outputs."""
    import torch  # noqa: PLC0415
    outs, times, cuda = [], [], device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    t_wall = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        if cuda:
            events[i][0].record()
        outs.append(trainer.train_step())
        if cuda:
            events[i][1].record()
        else:
            times.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    return times, time.perf_counter() - t_wall, outs


def measure(spec: dict) -> dict:
    """Run one row in this process. spec: variant, precision, preset, batch_size, seq_len, warmup, steps,
    device. Returns the row: status ok | unavailable (a FurnaceError: the combination cannot run here) |
    error (anything else, with its message); numbers only for ok rows."""
    import torch  # noqa: PLC0415
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
    import torch  # noqa: PLC0415

    from model.config import get_preset  # noqa: PLC0415
    from model.gpt import GPT  # noqa: PLC0415
    from train.options import TrainOptions  # noqa: PLC0415
    from train.precision import resolve_device  # noqa: PLC0415
    from train.setup import Runtime, check_seq_len  # noqa: PLC0415
    from train.task import LMTask  # noqa: PLC0415
    from train.trainer import Trainer  # noqa: PLC0415
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
        rss_base, max_rss_base = rss_bytes(), peak_rss_bytes()

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
    res = {
        "tokens_per_s": tokens / med,
        "tokens_per_s_wall": tokens * len(times) / wall,           # cross-check of the per-step timer
        "step_ms_median": 1e3 * med, "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
        "step_ms_stdev": 1e3 * statistics.stdev(times) if len(times) > 1 else 0.0,
        "spread_pct": 100 * (max(times) - min(times)) / med,
        "tokens_per_step": tokens, "warmup_s": warmup_s,
        "loss_first": warm[0]["loss"] if warm else outs[0]["loss"], "loss_last": outs[-1]["loss"],
        "kernels": cfg.kernels, "compiled": variant == "compile", "ran_as": _ran_as(prec, device),
        **_mfu_fields(cfg, T, tokens / med, prec, device),
    }
    if variant == "compile":
        from torch._dynamo.utils import counters  # noqa: PLC0415
        res["graph_breaks"] = int(sum(counters["graph_break"].values()))
    if cuda:
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - mem_base
        res["peak_mem_kind"] = "torch.cuda.max_memory_allocated (model, optimizer state, activations, workspace)"
    elif peak_rss_bytes() > max_rss_base:
        res["peak_mem_bytes"] = peak_rss_bytes() - rss_base
        res["peak_mem_kind"] = ("CPU: peak RSS of the row's process minus its RSS just before the model was built "
                                "(model, optimizer state, activations, compile workspace)")
    else:
        res["peak_mem_bytes"] = None
        res["peak_mem_kind"] = "CPU: the run never raised the process's earlier RSS high-water mark; not measurable"
    return res


def _ran_as(prec, device) -> str:
    """What really ran, in words: autocast dtype on which device, and how many Linear layers went FP8."""
    import torch  # noqa: PLC0415
    amp = ("fp32, no autocast" if prec.dtype == torch.float32 else
           f"{'bf16' if prec.dtype == torch.bfloat16 else 'fp16'} autocast on {device.type.upper()}")
    if not prec.fp8:
        return amp
    backend = "TransformerEngine" if prec.fp8 == "te" else "torchao float8 (dynamic tensorwise)"
    return f"{backend} on {len(prec.converted)} block Linear layers, {amp}; embeddings, LM head, norms, loss not FP8"


def _mfu_fields(cfg, seq_len: int, tps: float, prec, device) -> dict:
    import torch  # noqa: PLC0415

    from model.flops import flops_per_token, mfu, peak_tflops  # noqa: PLC0415
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


# ----------------------------------------------------------------------------- driver and report
def run_rows(specs: list[dict]) -> list[dict]:
    """Each spec -> a row: 'unavailable' straight away when precheck says so, else measured by a worker."""
    import torch  # noqa: PLC0415
    rows = []
    for spec in specs:
        label = f"{spec['variant']}/{spec['precision']}"
        why = precheck(spec["variant"], spec["precision"], torch.device(spec["device"]))
        if why:
            log.info(f"bench {label}: unavailable ({why})")
            row = {"variant": spec["variant"], "precision": spec["precision"], "status": "unavailable", "reason": why}
        else:
            log.info(f"bench {label}: running {spec['warmup']} warm-up + {spec['steps']} timed steps ...")
            row, why = run_worker([str(Path(__file__).resolve()), "--worker", json.dumps(spec)], label, ROW_TIMEOUT_S)
            row = row or {"variant": spec["variant"], "precision": spec["precision"], "status": "error", "reason": why}
            log.info(f"bench {label}: {row['status']}"
                     + (f" {row['tokens_per_s']:.0f} tok/s" if row["status"] == "ok" else f" ({row['reason']})"))
        rows.append({**{k: None for k in NUMBERS}, **row})
    return rows


def add_speedups(rows: list[dict]) -> None:
    base = next((r for r in rows if r["variant"] == "eager" and r["precision"] == "bf16" and r["status"] == "ok"),
                None)
    for r in rows:
        if r["status"] == "ok" and base is not None:
            r["speedup_vs_eager_bf16"] = r["tokens_per_s"] / base["tokens_per_s"]


def config_block(preset: str, batch_size: int, seq_len: int, warmup: int, steps: int, device) -> dict:
    import torch  # noqa: PLC0415

    from model.config import get_preset  # noqa: PLC0415
    from model.flops import PEAK_TFLOPS, device_peak_name, flops_per_token, matmul_params  # noqa: PLC0415
    from model.gpt import GPT  # noqa: PLC0415
    cfg = get_preset(preset)
    with torch.device("meta"):                      # parameter count without allocating the model
        n_params = GPT(cfg).num_params()
    peak_row = device_peak_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    bf16, fp8 = PEAK_TFLOPS[peak_row] if peak_row else (None, None)
    return {"preset": preset, "model": cfg.to_dict(), "num_params": n_params, "matmul_params": matmul_params(cfg),
            "batch_size": batch_size, "seq_len": seq_len, "tokens_per_step": batch_size * seq_len,
            "warmup_steps": warmup, "timed_steps": steps,
            "flops_per_token": flops_per_token(cfg, seq_len), "flop_formula": "6*N + 12*L*d*T (model/flops.py)",
            "peak_row": peak_row, "peak_tflops_bf16": bf16, "peak_tflops_fp8": fp8,
            "step": (f"train.trainer.Trainer.train_step: forward (fused linear+CE loss) + backward + grad clip "
                     f"{GRAD_CLIP} + AdamW (lr {LR}, wd {WEIGHT_DECAY}, train.optim.build_optimizer) on random tokens"),
            "timing": ("CUDA events around each step" if device.type == "cuda" else
                       "time.perf_counter around each step (CPU ops are synchronous)")
            + "; warm-up steps excluded; tokens_per_s = tokens_per_step / median step time",
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")},
            "torch_threads": torch.get_num_threads()}


def format_table(report: dict) -> str:
    head = ("variant", "precision", "status", "tok/s", "spread", "step ms", "MFU(bf16pk)", "MFU(fp8pk)",
            "peak mem", "vs eager-bf16")
    cells = (("tokens_per_s", "{:,.0f}"), ("spread_pct", "{:.0f}%"), ("step_ms_median", "{:.1f}"),
             ("mfu", "{:.1%}"), ("mfu_fp8_peak", "{:.1%}"), ("peak_mem_bytes", "{:,.0f} MiB"),
             ("speedup_vs_eager_bf16", "{:.2f}x"))
    body = [(r["variant"], r["precision"], r["status"],
             *(fmt.format(r[k] / 2**20 if k == "peak_mem_bytes" else r[k])
               if r["status"] == "ok" and r.get(k) is not None else "-" for k, fmt in cells))
            for r in report["results"]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    cfg = report["config"]
    out = [f"device: {report['device']}   preset {cfg['preset']}, batch {cfg['batch_size']} x seq "
           f"{cfg['seq_len']}, {cfg['warmup_steps']} warm-up + {cfg['timed_steps']} timed steps",
           line(head), line(["-" * w for w in widths]), *map(line, body), "notes:"]
    out += [f"  {r['variant']}/{r['precision']}: {r['reason']}" for r in report["results"] if r["status"] != "ok"]
    out += [f"  {r['variant']}/{r['precision']} ran as: {r['ran_as']}" for r in report["results"] if r.get("ran_as")]
    ok = [r for r in report["results"] if r["status"] == "ok"]
    for key, label in (("mfu_note", "MFU"), ("peak_mem_kind", "peak mem")):
        if ok and ok[0].get(key):
            out.append(f"  {label}: {ok[0][key]}")
    return "\n".join(out + ["  spread = (slowest - fastest timed step) / median step"])


def check_out_path(path: str | None, flag: str) -> Path | None:
    """Fail before measuring, not after, when an output path cannot be written."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.parent.is_dir():
        raise FurnaceError(f"{flag} {path}: folder {p.parent} does not exist; create it or pick another path")
    if p.is_dir():
        raise FurnaceError(f"{flag} {path} is a folder; give a file path")
    if flag == "--plot" and importlib.util.find_spec("matplotlib") is None:
        raise FurnaceError("--plot needs matplotlib, which is not installed: pip install matplotlib")
    return p


def write_plot(path: Path, report: dict) -> None:
    """Grouped bars: tokens/s per variant (median step; whiskers: slowest and fastest step), one bar per
    precision; rows that did not run are marked n/a."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from model.fileio import atomic_path  # noqa: PLC0415
    rows = report["results"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    width = 0.8 / len(precisions)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(variants), 4))
    for j, prec in enumerate(precisions):
        for i, var in enumerate(variants):
            r = next((r for r in rows if r["variant"] == var and r["precision"] == prec), None)
            x = i + (j - (len(precisions) - 1) / 2) * width
            if r is not None and r["status"] == "ok":
                n = r["tokens_per_step"]
                lo, hi = n / (r["step_ms_max"] / 1e3), n / (r["step_ms_min"] / 1e3)   # slowest, fastest step
                ax.bar(x, r["tokens_per_s"], width, color=f"C{j}", label=prec if i == 0 else None,
                       yerr=[[r["tokens_per_s"] - lo], [hi - r["tokens_per_s"]]], capsize=2)
            else:
                ax.bar(x, 0, width, color=f"C{j}", label=prec if i == 0 else None)
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(variants)), variants)
    ax.set_ylabel("tokens/s (median step; whiskers: slowest/fastest)")
    cfg = report["config"]
    ax.set_title(f"{cfg['preset']} B={cfg['batch_size']} T={cfg['seq_len']} on {report['device'][:60]}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def parse_list(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items or any(s not in allowed for s in items):
        raise FurnaceError(f"{flag} {text!r}: expected a comma-separated list of {', '.join(allowed)}")
    return list(dict.fromkeys(items))


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

    from model.config import get_preset  # noqa: PLC0415
    from train.metrics import run_record  # noqa: PLC0415
    from train.precision import resolve_device  # noqa: PLC0415
    from train.setup import check_seq_len  # noqa: PLC0415
    device = resolve_device(args.device)
    preset, batch, seq, warmup, steps = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    preset = args.preset or preset
    cfg = get_preset(preset)
    batch = args.batch_size or batch
    seq = args.seq_len or min(seq, cfg.max_seq_len)
    steps = args.steps or steps
    warmup = warmup if args.warmup < 0 else args.warmup
    for flag, v in (("--batch-size", batch), ("--seq-len", seq), ("--steps", steps)):
        if v < 1:
            raise FurnaceError(f"{flag} {v}: expected an integer >= 1")
    check_seq_len(seq, cfg, preset)
    variants = parse_list(args.variants, VARIANTS, "--variants")
    precisions = parse_list(args.precisions, PRECISIONS, "--precisions")
    json_path, plot_path = check_out_path(args.json, "--json"), check_out_path(args.plot, "--plot")

    record = run_record(device)
    specs = [dict(variant=v, precision=pr, preset=preset, batch_size=batch, seq_len=seq, warmup=warmup,
                  steps=steps, device=str(device)) for v in variants for pr in precisions]
    rows = run_rows(specs)
    add_speedups(rows)
    report = {**record, "load_avg_1m_end": os.getloadavg()[0],
              "config": config_block(preset, batch, seq, warmup, steps, device), "results": rows}
    if plot_path:
        write_plot(plot_path, report)
    print(format_table(report))
    finish_report(report, json_path)
    return 0


if __name__ == "__main__":
    run_cli(main)
