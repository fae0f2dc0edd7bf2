"""The one Trainer: pretraining, SFT and DPO (and whatever comes next) are tasks it runs.

The Trainer owns what is the same for every method: the loop, optimizer and schedule, precision (FP8
conversion, autocast, fp16 scaling), compile, DDP, EMA, checkpoints and exact resume, metrics, wandb and the
loss plot, with its settings read from `TrainOptions` itself. A task (train/task.py) says what differs.

Per optimizer step: fetch `grad_accum` micro-batches, count their loss units across all ranks, and weight
each micro-batch's mean loss by its share of that total, so 8 x 1 and 1 x 8 give the same update. Then
clip, skip non-finite steps (abort after several in a row), set the scheduled lr, step AdamW, update EMA,
log, evaluate and checkpoint on schedule.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from kernels.common import FurnaceError
from model.fileio import atomic_write_json
from model.flops import mfu as compute_mfu, peak_tflops
from model.gpt import Block
from model.io import eval_mode, load as load_model, unwrap
from train.checkpoint import (last_good_checkpoint, load_trainer_state, lock_run_dir, rng_state, save_checkpoint,
                              set_rng_state, truncate_metrics, unlock_run_dir, unsafe_to_save)
from train.metrics import MetricsLog, format_duration, format_step, plot_losses, run_record, summary_lines
from train.optim import build_optimizer, lr_at
from train.options import TrainOptions
from train.precision import Precision, convert_linears
from train.setup import Runtime

log = logging.getLogger("furnace")
TIMING_WARMUP = 3  # steps excluded from the run's summary tokens/s (allocator, compile, autotune)
AUTO_EVALS, AUTO_EVAL_COST = 20, 0.03  # --eval-every -1: about 20 evaluations, at most ~3% of the training time
EVAL_MIN_BATCHES = 6                   # ... each reading at least this many validation batches
ESTIMATE_STEPS = 8  # steps timed (after the warm-up, none right after an evaluation) before the cost estimate


def eval_batches(opts: TrainOptions, tokens_per_step: int, batches_in_split: int) -> tuple[int, int]:
    """(validation batches per in-run evaluation, batches of the final one). The final evaluation reads
    --eval-tokens (at most one pass over the split): the number to compare between runs. With --eval-every N
    every evaluation reads as much. With the automatic cadence (-1) an in-run one reads what keeps AUTO_EVALS + 1
    of them (a forward pass: ~1/3 of a training token's FLOPs) within AUTO_EVAL_COST of the run's compute, but at
    least EVAL_MIN_BATCHES (LMTask spreads them over the final's batches); the cadence then follows the
    measured cost, so a floor above the budget means fewer evaluations, not a dearer run."""
    final = max(1, min(opts.eval_tokens // (opts.batch_size * opts.seq_len), batches_in_split))
    if opts.eval_every != -1:
        return final, final
    budget = 3 * AUTO_EVAL_COST * opts.max_steps * tokens_per_step / (AUTO_EVALS + 1)
    return min(final, max(EVAL_MIN_BATCHES, int(budget) // (opts.batch_size * opts.seq_len))), final


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0  # loss units seen (tokens, trained tokens or pairs: the task's unit)
    bad_in_row: int = 0
    bad_total: int = 0
    extra: dict = field(default_factory=dict)  # e.g. the wandb run id


class Trainer:
    """Train `model` (unwrapped, on rt.device) on `task` to opts.max_steps. `resume`: a checkpoint whose
    weights, optimizer, loader position, RNG and counters are restored before the model is wrapped.
    `optimizer`: replaces the AdamW of build_optimizer (tests use SGD to compare with a hand-made step)."""

    def __init__(self, opts: TrainOptions, task, model: torch.nn.Module, rt: Runtime | None = None,
                 run_dir: Path | str = ".", *, resume: Path | None = None, tokenizer_dir: Path | None = None,
                 optimizer: torch.optim.Optimizer | None = None):
        self.opts, self.task = opts, task
        self.rt = rt = rt or Runtime(torch.device("cpu"), precision=Precision(torch.float32))
        self.prec, self.device = rt.precision, rt.device
        self.run_dir, self.resume, self.tokenizer_dir = Path(run_dir), resume, tokenizer_dir
        if resume is not None:
            if getattr(model, "lora", None) is not None:  # an adapter-only checkpoint: the base is already here
                from model.lora import ADAPTER_WEIGHTS, load_adapter_weights
                load_adapter_weights(model, load_file(str(resume / ADAPTER_WEIGHTS)), str(resume))
            else:
                model.load_state_dict(load_model(resume).state_dict())
        self.model = _wrap(model, opts, rt)
        self.opt = optimizer or build_optimizer(model, opts.lr, opts.weight_decay, rt.device.type)
        self.warmup = opts.warmup or min(100, max(1, opts.max_steps // 20))
        self.peak, self.peak8 = opts.peak_tflops or None, None  # dense BF16 and FP8 TFLOP/s of the device, for MFU
        if rt.device.type == "cuda":
            name = torch.cuda.get_device_name(rt.device)
            self.peak, self.peak8 = self.peak or peak_tflops(name, "bf16"), peak_tflops(name, "fp8")
            if self.peak is None:
                log.info(f"MFU: unknown device {name!r} (pass --peak-tflops to report MFU)")
        self.state = TrainState()
        # a disabled scaler (all but fp16) passes the loss and the optimizer step through unchanged
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=self.prec.dtype == torch.float16)
        self.ema = {k: v.detach().float().clone() for k, v in _float_tensors(model).items()} if opts.ema > 0 else None
        self.metrics, self.wandb_run, self._mfu_warned = None, None, False
        self.step_times: list[float] = []
        self.eval_every = opts.eval_every if opts.eval_every >= 0 else None  # None: chosen after timing
        self.eval_seconds: float | None = None
        if resume is not None:
            self.load_state_dict(load_trainer_state(resume))
            if (resume / "ema.safetensors").is_file():
                self.ema = {k: v.to(self.device).float() for k, v in load_file(str(resume / "ema.safetensors")).items()}

    # ---- the whole job: run folder, wandb, fit, plot -----------------------------------------------------
    def run(self, record: dict) -> dict:
        """Write OUT/config.json (options, model, device, versions, commit + `record`; a fresh run only) or
        drop the killed run's metric lines (a resumed one), open wandb, fit, plot the losses."""
        if self.rt.is_main:
            lock_run_dir(self.run_dir)  # creates it; a second process on the same --out stops here
            if self.resume is not None:
                truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)
            else:
                m, p = unwrap(self.model), self.prec
                atomic_write_json(self.run_dir / "config.json", {
                    "train": self.opts.to_dict(), "model": m.config.to_dict(), "num_params": m.num_params(),
                    **run_record(self.device), "world_size": self.rt.world_size,
                    "precision": {"name": p.name, "reason": p.reason, "fp8_layers": len(p.converted)}, **record},
                    default=str)
            if self.opts.wandb:  # a resumed run continues the same wandb run; WANDB_MODE=offline works
                try:
                    import wandb
                except ImportError:
                    raise FurnaceError("--wandb needs the wandb package: pip install wandb (or pip install -e "
                                       "'.[log]')") from None
                self.wandb_run = wandb.init(project=self.opts.wandb_project, id=self.state.extra.get("wandb_id"),
                                            resume="allow", dir=str(self.run_dir), config=self.opts.to_dict(),
                                            name=self.run_dir.name)
                self.state.extra["wandb_id"] = self.wandb_run.id
        if self.resume is not None:
            log.info(f"resumed from {self.resume} at step {self.state.step}")
        t0 = time.perf_counter()
        try:
            summary = self.fit()
        finally:
            unlock_run_dir(self.run_dir)  # a no-op on ranks that hold no lock
            if self.wandb_run is not None:
                self.wandb_run.finish()
        summary.update(seconds=time.perf_counter() - t0, unit=self.task.unit)
        if self.rt.is_main:
            plot = plot_losses(self.run_dir)
            summary["plot"] = str(plot) if plot else None
            summary["record"] = str(atomic_write_json(self.run_dir / "summary.json", summary, default=str))
            for line in summary_lines(summary):
                log.info(line)
        return summary

    # ---- state for checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**dataclasses.asdict(self.state), "optimizer": self.opt.state_dict(), "rng": rng_state(),
                "loader": self.task.train_loader.state_dict(), "scaler": self.scaler.state_dict(),
                # TransformerEngine's FP8 scaling state (amax history, scales): kept out of the portable
                # model.safetensors, but needed for an exact resume of a TE FP8 run
                "fp8_extra_state": {k: v for k, v in unwrap(self.model).state_dict().items()
                                    if k.endswith("_extra_state")}}

    def load_state_dict(self, d: dict) -> None:
        self.state = TrainState(**{f.name: d[f.name] for f in dataclasses.fields(TrainState) if f.name in d})
        self.opt.load_state_dict(d["optimizer"])
        self.task.train_loader.load_state_dict(d["loader"])
        set_rng_state(d["rng"])
        if d.get("scaler"):
            self.scaler.load_state_dict(d["scaler"])
        if d.get("fp8_extra_state"):
            unwrap(self.model).load_state_dict(d["fp8_extra_state"], strict=False)

    def save(self) -> Path | None:
        if not self.rt.is_main:
            return None
        why = unsafe_to_save(self.model, self.state.bad_in_row)
        if why:  # the newest checkpoint stays the last good one
            log.warning(f"step {self.state.step}: no checkpoint written ({why}); kept: {last_good_checkpoint(self.run_dir)}")
            return None
        path = save_checkpoint(self.run_dir, self.state.step, self.model, self.state_dict(), self.tokenizer_dir,
                               self.opts.keep_last, self.ema, weights_only_older=self.opts.keep_weights_only)
        log.info(f"checkpoint: {path}")
        return path

    # ---- one optimizer step ------------------------------------------------------------------------
    def _all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.rt.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def train_step(self) -> dict:
        opts, model, task, world, st = self.opts, self.model, self.task, self.rt.world_size, self.state
        batches = [task.train_loader.next_batch() for _ in range(opts.grad_accum)]
        counts = [task.count(b) for b in batches]
        n_global = int(self._all_sum(torch.tensor(sum(counts), dtype=torch.float64, device=self.device)).item())
        loss_sum = torch.zeros((), device=self.device)
        extra: dict[str, float] = {}  # the task's own metrics (e.g. DPO reward accuracy), weighted like the loss
        for i, (b, n) in enumerate(zip(batches, counts)):
            sync = world == 1 or i == len(batches) - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                with self.prec.autocast(self.device.type):
                    loss, mets = task.loss(model, b)
                for k, v in mets.items():
                    extra[k] = extra.get(k, 0.0) + float(v) * n / max(sum(counts), 1)
                # DDP averages gradients over ranks, hence the world-size factor.
                self.scaler.scale(loss.float() * (n * world / max(n_global, 1))).backward()
            loss_sum += loss.detach().float() * n
        loss_val = (self._all_sum(loss_sum) / max(n_global, 1)).item()
        self.scaler.unscale_(self.opt)
        params = [p for p in model.parameters() if p.grad is not None]
        gnorm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip or math.inf).item() if params else 0.0
        lr = lr_at(st.step, opts.max_steps, opts.lr, opts.min_lr, self.warmup, opts.schedule, opts.wsd_decay)
        for g in self.opt.param_groups:
            g["lr"] = lr
        finite = math.isfinite(loss_val) and math.isfinite(gnorm)
        if finite:
            self.scaler.step(self.opt)
            if self.ema is not None:
                for k, v in _float_tensors(unwrap(model)).items():
                    if k in self.ema:
                        self.ema[k].mul_(opts.ema).add_(v.detach().float(), alpha=1 - opts.ema)
        self.scaler.update()
        st.bad_in_row = 0 if finite else st.bad_in_row + 1
        st.bad_total += not finite
        self.opt.zero_grad(set_to_none=True)
        st.step += 1
        st.tokens += n_global
        return {"loss": loss_val, "lr": lr, "grad_norm": gnorm, "skipped": not finite, "n_tokens": n_global,
                "metrics": extra}

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        opts, st, is_main = self.opts, self.state, self.rt.is_main
        self.metrics = MetricsLog(self.run_dir, enabled=is_main, wandb_run=self.wandb_run)
        if is_main:
            self._log_checkpoint_size()  # before the bar: nothing prints into its line
        self.model.train()
        first_step, stop, bar = st.step, _StopFlag(), None
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(self.metrics.close)
            cleanup.callback(stop.restore)
            if is_main and sys.stderr.isatty():
                from tqdm import tqdm
                from tqdm.contrib.logging import logging_redirect_tqdm
                bar = cleanup.enter_context(tqdm(total=opts.max_steps, initial=st.step, dynamic_ncols=True,
                                                 desc="train"))
                cleanup.enter_context(logging_redirect_tqdm())  # log lines print above the bar, never inside it
            if self.eval_every is None or (st.step == 0 and self.eval_every):
                self._log_eval()  # the starting point, and (automatic cadence) what one evaluation costs
            t_start, paused = time.perf_counter(), True
            while st.step < opts.max_steps:
                t0 = self._synced_clock()
                out = self.train_step()
                dt = self._synced_clock() - t0        # the step alone: evaluation and checkpoints excluded
                if st.step - first_step > TIMING_WARMUP and not paused:  # caches are cold after an eval or a save
                    self.step_times.append(dt)
                    if len(self.step_times) == ESTIMATE_STEPS:
                        self._on_timed()
                paused = False
                rec = self._record(out, dt)
                self.metrics.write(rec)
                eta = (time.perf_counter() - t_start) / (st.step - first_step) * (opts.max_steps - st.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(format_step(rec, unit=self.task.unit).split(" | ", 1)[1])
                elif is_main and (st.step % opts.log_every == 0 or st.step == 1):
                    log.info(format_step(rec, extra=tuple(out["metrics"]), unit=self.task.unit)
                             + f" | ETA {format_duration(eta)}")
                if out["skipped"]:
                    log.info(f"step {st.step}: non-finite loss or grad norm (loss {out['loss']}, grad norm "
                             f"{out['grad_norm']}); step skipped ({st.bad_in_row} in a row, {st.bad_total} in total)")
                    if st.bad_in_row >= opts.max_bad_steps:
                        raise FurnaceError(
                            f"{st.bad_in_row} non-finite steps in a row at step {st.step}: training diverged. Lower "
                            f"--lr, raise --warmup, set --grad-clip, try --z-loss 1e-4 or train without --fp8; the "
                            f"last good checkpoint is kept: {last_good_checkpoint(self.run_dir)}")
                if self.rt.world_size > 1:  # Ctrl-C is honoured between steps, on all ranks together
                    stop.requested = bool(self._all_sum(torch.tensor(float(stop.requested), device=self.device)))
                if stop.requested:
                    break
                if self.eval_every and st.step % self.eval_every == 0 and st.step < opts.max_steps:
                    self._log_eval()
                    paused = True
                if opts.save_every and st.step % opts.save_every == 0 and st.step < opts.max_steps:
                    self.save()
                    paused = True
            summary = {"steps": st.step, "tokens": st.tokens, "skipped_steps": st.bad_total,
                       "interrupted": stop.requested}
            if stop.requested:
                log.info(f"interrupted at step {st.step}: saving a checkpoint; continue with --resume")
            else:
                summary.update(self._log_eval(final=True))
            summary["final_loss"] = self.metrics.last.get("loss")
        ck = self.save()
        summary["checkpoint"] = str(ck) if ck else None
        if self.step_times:
            summary["tokens_per_s"] = st.tokens / max(st.step, 1) / statistics.median(self.step_times)
        return summary

    def _synced_clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _record(self, out: dict, dt: float) -> dict:
        tps = out["n_tokens"] / dt if dt > 0 else 0.0
        rec = {"step": self.state.step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
               "tokens_per_s": tps, "tokens": self.state.tokens, "step_ms": 1000 * dt}
        fpu, peak8 = self.task.flops_per_unit, self.peak8 if self.prec.fp8 else None
        if fpu and self.peak:
            per_device = tps / self.rt.world_size  # the peak is one device's
            try:  # vs the BF16 peak; an FP8 run may go past it, up to the FP8 peak
                rec["mfu"] = compute_mfu(fpu, per_device, self.peak, limit=(peak8 or self.peak) / self.peak)
                if peak8:
                    rec["mfu_fp8_peak"] = compute_mfu(fpu, per_device, peak8)
            except ValueError as e:  # an impossible MFU is a measurement bug: say so once, never log the number
                if not self._mfu_warned:
                    log.warning(f"MFU not reported: {e}")
                    self._mfu_warned = True
        if self.device.type == "cuda":
            rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        if out["skipped"]:
            rec["skipped"] = True
        rec.update(out["metrics"])
        if hasattr(self.task, "step_metrics"):  # metrics that need the step's wall time (GRPO: sampling vs training)
            rec.update(self.task.step_metrics(dt))
        return rec

    def _log_eval(self, final: bool = False) -> dict:
        """The task's evaluation (the unwrapped model in eval mode, under the run's autocast) and, on rank 0, its
        sample from the fixed prompt (printed and appended to OUT/samples.jsonl); an in-run one is timed for the
        automatic cadence and the cost estimate."""
        t0 = time.perf_counter()
        with torch.no_grad(), eval_mode(unwrap(self.model)) as model, self.prec.autocast(self.device.type):
            ev = self.task.evaluate(model, final=final)
        if ev:
            self.metrics.write({"step": self.state.step, **ev})
            if self.rt.is_main:
                log.info(f"step {self.state.step} | " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        sample = getattr(self.task, "sample", None)
        if sample is not None and self.rt.is_main:
            with eval_mode(unwrap(self.model)) as model:  # full precision: a few dozen tokens, no autocast questions
                prompt, text = sample(model)
            log.info(f"sample at step {self.state.step}: {prompt!r} -> {text!r}")
            with open(self.run_dir / "samples.jsonl", "a") as f:
                f.write(json.dumps({"step": self.state.step, "prompt": prompt, "text": text}) + "\n")
        if not final:
            self.eval_seconds = time.perf_counter() - t0
        return ev

    def _on_timed(self) -> None:
        """After ESTIMATE_STEPS timed steps: the automatic evaluation cadence, and what the rest of the run will
        cost: the median step (the first steps, slow while caches and the allocator warm up, are not timed)
        times the steps left, plus the evaluations left at what the last one took."""
        opts, st = self.opts, self.state
        s_per_step = statistics.median(self.step_times)
        eval_s = self.eval_seconds or 0.0
        if self.eval_every is None:
            by_cost = math.ceil(eval_s / (AUTO_EVAL_COST * s_per_step)) if s_per_step else 1
            self.eval_every = max(1, -(-opts.max_steps // AUTO_EVALS), by_cost)
            if self.rt.is_main:
                share = eval_s / max(self.eval_every * s_per_step, 1e-9)
                log.info(f"evaluation: every {self.eval_every} steps ({eval_s:.1f} s each, ~{100 * share:.1f}% "
                         f"of the training time; --eval-every N to change, 0 = only at the end)")
        if self.rt.is_main and s_per_step:
            steps_left = opts.max_steps - st.step
            evals_left = 1 + ((opts.max_steps - 1) // self.eval_every - st.step // self.eval_every
                              if self.eval_every else 0)  # in-run ones, and the final one
            left = steps_left * s_per_step + evals_left * eval_s
            msg = (f"speed: {s_per_step:.2f} s/step (median of {len(self.step_times)} steps after the first "
                   f"{TIMING_WARMUP}): about {format_duration(left)} for the {steps_left} steps left and "
                   f"{evals_left} evaluation{'s' if evals_left > 1 else ''}")
            if left > 3600:
                msg += (" (a quicker run: a smaller --preset, fewer --max-steps or --tokens; Ctrl-C saves a "
                        "checkpoint, --resume continues)")
            log.info(msg)

    def _log_checkpoint_size(self) -> None:
        """Each checkpoint holds the weights (fp32) and the trainer state (AdamW's two moments: twice the
        weights), so a run keeps about 3 x weights x --keep-last on disk."""
        def mb(n: float) -> str:
            return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"

        w = 4 * sum(p.numel() for p in unwrap(self.model).parameters())
        state, k, slim = 2 * w + (w if self.ema is not None else 0), self.opts.keep_last, self.opts.keep_weights_only
        total = (w + state) + (k - 1) * (w if slim else w + state)
        log.info(f"checkpoints: ~{mb(w + state)} each (weights {mb(w)}, trainer state {mb(state)}: optimizer "
                 f"moments{', EMA' if self.ema is not None else ''}); --keep-last {k}: up to {mb(total)}"
                 + ("" if slim or k == 1 else " (--keep-weights-only keeps only the weights of the older ones)"))


def _wrap(model: torch.nn.Module, opts: TrainOptions, rt: Runtime) -> torch.nn.Module:
    """FP8 conversion, activation checkpointing, torch.compile, then DDP. Activation checkpointing recomputes
    each transformer block in backward instead of keeping its activations; its wrapper keeps the state_dict's
    names (checkpoints stay plain). Under TransformerEngine FP8, torch.utils.checkpoint would recompute outside
    fp8_autocast: TE's own checkpoint restores the FP8 state and reuses the forward's scaling factors
    (TransformerEngine issue 415)."""
    convert_linears(model, rt.precision)
    if opts.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                                  checkpoint_wrapper)
        if rt.precision.fp8 == "te":
            from transformer_engine.pytorch.distributed import checkpoint as fn
        else:
            from torch.utils.checkpoint import checkpoint as fn
        wrapper = functools.partial(checkpoint_wrapper, checkpoint_fn=fn, use_reentrant=False)
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, Block))
    wrapped = torch.compile(model) if opts.compile else model
    if rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(wrapped, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return wrapped


def _float_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict's floating-point parameters and persistent buffers, under the same names, without
    calling state_dict(): TransformerEngine's `_extra_state` (not a float tensor; in older TE a BytesIO)
    would be serialised, with a device-to-host copy, for every layer at every EMA update."""
    out = {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        pre = prefix.replace("._checkpoint_wrapped_module", "") + "." if prefix else ""  # --activation-checkpointing
        out.update((pre + n, t) for n, t in mod.named_parameters(recurse=False, remove_duplicate=False))
        out.update((pre + n, t) for n, t in mod.named_buffers(recurse=False)
                   if n not in mod._non_persistent_buffers_set)
    return {k: v for k, v in out.items() if v is not None and v.is_floating_point()}


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (and save); a second one aborts."""

    def __init__(self):
        self.requested, self._prev = False, None
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.info("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    def restore(self):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
