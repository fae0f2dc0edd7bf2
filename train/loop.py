"""The one training loop (pretraining, SFT and DPO all run it).

Per optimizer step: fetch `grad_accum` micro-batches, count their loss units (target tokens, or pairs
for DPO) across all ranks, and weight each micro-batch's mean loss by its share of that total, so
8 x 1 and 1 x 8 give the same update. Then clip, skip non-finite steps (abort after several in a row),
set the scheduled lr, step AdamW, update EMA, log, evaluate and checkpoint on schedule.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from model.errors import FurnaceError
from model.flops import mfu as compute_mfu
from model.io import unwrap
from train.checkpoint import last_good_checkpoint, rng_state, save_checkpoint, set_rng_state, unsafe_to_save
from train.metrics import MetricsLog, StepTimer, format_step
from train.optim import lr_at, set_lr
from train.precision import Precision

log = logging.getLogger("furnace")


TIMING_WARMUP = 3
_KILL_AT_STEP = int(os.environ.get("FURNACE_TEST_SIGKILL_AT_STEP", "-1"))  # steps excluded from the run's summary tokens/s (allocator, compile, autotune)


def lm_loss(model, batch, z_loss: float = 0.0):
    """Next-token loss of a (x, y) batch; y = -100 marks positions without a target."""
    x, y = batch
    _, loss = model(x, y, z_loss=z_loss)
    return loss, {}


def count_targets(batch) -> int:
    return int((batch[1] != -100).sum())


@dataclass
class LoopConfig:
    max_steps: int
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 0
    schedule: str = "cosine"
    wsd_decay: float = 0.2
    grad_clip: float = 1.0
    z_loss: float = 0.0
    eval_every: int = 0
    eval_batches: int = 4
    save_every: int = 0
    keep_last: int = 3
    ema: float = 0.0
    max_bad_steps: int = 5
    log_every: int = 10
    flops_per_token: float = 0.0      # model.flops formula at the training seq_len
    peak_tflops: float | None = None  # dense BF16 peak of this device (None: MFU not reported)
    peak_tflops_fp8: float | None = None
    unit: str = "tok"                 # what count_fn counts, for the console ("pair" for DPO)


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    bad_in_row: int = 0
    bad_total: int = 0
    extra: dict = field(default_factory=dict)  # e.g. the wandb run id


class Trainer:
    def __init__(self, cfg: LoopConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train_loader, val_loader, precision: Precision, device: torch.device, run_dir: Path,
                 tokenizer_dir: Path | None, metrics: MetricsLog, rank: int = 0, world_size: int = 1,
                 loss_fn: Callable = lm_loss, count_fn: Callable = count_targets, eval_fn: Callable | None = None):
        self.cfg, self.model, self.opt = cfg, model, optimizer
        self.train_loader, self.val_loader = train_loader, val_loader
        self.prec, self.device, self.run_dir = precision, device, run_dir
        self.tokenizer_dir, self.metrics = tokenizer_dir, metrics
        self.rank, self.world = rank, world_size
        self.loss_fn, self.count_fn, self.eval_fn = loss_fn, count_fn, eval_fn
        self.state = TrainState()
        self.scaler = torch.amp.GradScaler(device.type) if precision.dtype == torch.float16 else None
        self.ema = None
        if cfg.ema > 0:
            self.ema = {k: v.detach().float().clone() for k, v in _float_tensors(unwrap(model)).items()}
        self.step_times: list[float] = []

    # ---- state for checkpoints -------------------------------------------------------------------
    def trainer_state(self, loader_state: dict) -> dict:
        s = self.state
        return {"step": s.step, "tokens": s.tokens, "bad_in_row": s.bad_in_row, "bad_total": s.bad_total,
                "extra": s.extra, "optimizer": self.opt.state_dict(), "loader": loader_state,
                "rng": rng_state(), "scaler": self.scaler.state_dict() if self.scaler else None,
                # TransformerEngine's FP8 scaling state (amax history, scales): kept out of the portable
                # model.safetensors, but needed for an exact resume of a TE FP8 run
                "fp8_extra_state": {k: v for k, v in unwrap(self.model).state_dict().items()
                                    if k.endswith("_extra_state")}}

    def load_trainer_state(self, d: dict) -> None:
        self.state = TrainState(step=d["step"], tokens=d["tokens"], bad_in_row=d["bad_in_row"],
                                bad_total=d["bad_total"], extra=d.get("extra", {}))
        self.opt.load_state_dict(d["optimizer"])
        self.train_loader.load_state_dict(d["loader"])
        set_rng_state(d["rng"])
        if self.scaler and d.get("scaler"):
            self.scaler.load_state_dict(d["scaler"])
        if d.get("fp8_extra_state"):
            unwrap(self.model).load_state_dict(d["fp8_extra_state"], strict=False)

    def load_ema(self, ema: dict) -> None:
        self.ema = {k: v.to(self.device).float() for k, v in ema.items()}

    def save(self, loader_state: dict) -> Path | None:
        if self.rank != 0:
            return None
        why = unsafe_to_save(self.model, self.state.bad_in_row)
        if why:  # the newest checkpoint stays the last good one
            log.warning(f"step {self.state.step}: no checkpoint written ({why}); kept: {last_good_checkpoint(self.run_dir)}")
            return None
        path = save_checkpoint(self.run_dir, self.state.step, self.model, self.trainer_state(loader_state),
                               self.tokenizer_dir, self.cfg.keep_last, self.ema)
        log.info(f"checkpoint: {path}")
        return path

    # ---- one optimizer step ------------------------------------------------------------------------
    def _all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        batches = [self.train_loader.next_batch() for _ in range(cfg.grad_accum)]
        counts = [self.count_fn(b) for b in batches]
        n_global = int(self._all_sum(torch.tensor(sum(counts), dtype=torch.float64, device=self.device)).item())
        loss_sum = torch.zeros((), device=self.device)
        extra: dict[str, float] = {}  # loss_fn's own metrics (e.g. DPO reward accuracy), weighted like the loss
        for i, (b, n) in enumerate(zip(batches, counts)):
            sync = self.world == 1 or i == len(batches) - 1
            ctx = contextlib.nullcontext() if sync else model.no_sync()
            with ctx:
                with self.prec.autocast(self.device.type):
                    loss, mets = self.loss_fn(model, b)
                for k, v in mets.items():
                    extra[k] = extra.get(k, 0.0) + float(v) * n / max(sum(counts), 1)
                # DDP averages gradients over ranks, hence the world-size factor.
                scaled = loss.float() * (n * self.world / max(n_global, 1))
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach().float() * n
        loss_val = (self._all_sum(loss_sum) / max(n_global, 1)).item()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        params = [p for p in model.parameters() if p.grad is not None]
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip).item() if params else 0.0
        lr = lr_at(self.state.step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup, cfg.schedule, cfg.wsd_decay)
        set_lr(self.opt, lr)
        finite = math.isfinite(loss_val) and math.isfinite(gnorm)
        if finite:
            if self.scaler:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            self._update_ema()
            self.state.bad_in_row = 0
        else:
            if self.scaler:
                self.scaler.update()
            self.state.bad_in_row += 1
            self.state.bad_total += 1
        self.opt.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens += n_global
        return {"loss": loss_val, "lr": lr, "grad_norm": gnorm, "skipped": not finite, "n_tokens": n_global,
                "metrics": extra}

    @torch.no_grad()
    def _update_ema(self):
        if self.ema is None:
            return
        d = self.cfg.ema
        for k, v in _float_tensors(unwrap(self.model)).items():
            if k in self.ema:
                self.ema[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    # ---- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.eval_fn is not None:
            return self.eval_fn(self)
        if self.val_loader is None:
            return {}
        model = unwrap(self.model)
        was_training = model.training
        model.eval()
        self.val_loader.reset()
        total, n = 0.0, 0
        for _ in range(self.cfg.eval_batches):
            b = self.val_loader.next_batch()
            k = self.count_fn(b)
            with self.prec.autocast(self.device.type):
                loss, _ = self.loss_fn(model, b)
            total += loss.float().item() * k
            n += k
        model.train(was_training)
        return {"val_loss": total / max(n, 1)}

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, st = self.cfg, self.state
        timer = StepTimer(self.device)
        is_main = self.rank == 0
        bar = None
        if is_main and sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=cfg.max_steps, initial=st.step, dynamic_ncols=True, desc="train")
        self.model.train()
        if st.step == 0 and cfg.eval_every:
            self._log_eval()
        stop = _StopFlag()
        try:
            while st.step < cfg.max_steps:
                timer.start()
                out = self.train_step()
                dt = timer.stop()
                if st.step > TIMING_WARMUP:
                    self.step_times.append(dt)
                rec = self._record(out, dt)
                self.metrics.write(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(format_step(rec, unit=self.cfg.unit).split(" | ", 1)[1])
                elif is_main and (st.step % cfg.log_every == 0 or st.step == 1):
                    log.info(format_step(rec, extra=tuple(out.get("metrics", {})), unit=self.cfg.unit))
                if out["skipped"]:
                    self._on_bad_step(out)
                if self._stop_requested(stop):
                    break
                if cfg.eval_every and st.step % cfg.eval_every == 0 and st.step < cfg.max_steps:
                    self._log_eval()
                if cfg.save_every and st.step % cfg.save_every == 0 and st.step < cfg.max_steps:
                    self.save(self.train_loader.state_dict())
                if st.step == _KILL_AT_STEP:  # test hook: die like `kill -9` would (tests/test_pretrain.py)
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
        summary = {"steps": st.step, "tokens": st.tokens, "skipped_steps": st.bad_total,
                   "interrupted": stop.requested}
        if stop.requested:
            log.info(f"interrupted at step {st.step}: saving a checkpoint; continue with --resume")
        else:
            summary.update(self._log_eval())
        ck = self.save(self.train_loader.state_dict())
        summary["checkpoint"] = str(ck) if ck else None
        if self.step_times:
            summary["tokens_per_s"] = self._tokens_per_step() / statistics.median(self.step_times)
        return summary

    def _stop_requested(self, stop: "_StopFlag") -> bool:
        """Ctrl-C is honoured between steps, on all ranks together."""
        flag = torch.tensor(float(stop.requested), device=self.device)
        return bool(self._all_sum(flag).item() > 0) if self.world > 1 else stop.requested

    def _on_bad_step(self, out: dict) -> None:
        st = self.state
        log.info(f"step {st.step}: non-finite loss or grad norm (loss {out['loss']}, grad norm "
                 f"{out['grad_norm']}); step skipped ({st.bad_in_row} in a row, {st.bad_total} in total)")
        if st.bad_in_row >= self.cfg.max_bad_steps:
            raise FurnaceError(
                f"{st.bad_in_row} non-finite steps in a row at step {st.step}: training diverged. Lower --lr, "
                f"raise --warmup, set --grad-clip, try --z-loss 1e-4 or train without --fp8; the last good "
                f"checkpoint is kept: {last_good_checkpoint(self.run_dir)}")

    def _tokens_per_step(self) -> float:
        return self.state.tokens / max(self.state.step, 1)

    def _record(self, out: dict, dt: float) -> dict:
        tps = out["n_tokens"] / dt if dt > 0 else 0.0
        rec = {"step": self.state.step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
               "tokens_per_s": tps, "tokens": self.state.tokens, "step_ms": 1000 * dt}
        if self.cfg.flops_per_token and self.cfg.peak_tflops:
            peak8 = self.cfg.peak_tflops_fp8 if self.prec.fp8 else None
            try:  # vs the BF16 peak; an FP8 run may go past it, up to the FP8 peak
                per_device = tps / self.world  # the peak is one device's
                rec["mfu"] = compute_mfu(self.cfg.flops_per_token, per_device, self.cfg.peak_tflops,
                                         limit=peak8 / self.cfg.peak_tflops if peak8 else 1.0)
                if peak8:
                    rec["mfu_fp8_peak"] = compute_mfu(self.cfg.flops_per_token, per_device, peak8)
            except ValueError as e:  # an impossible MFU is a measurement bug: say so once, never log the number
                if not getattr(self, "_mfu_warned", False):
                    log.warning(f"MFU not reported: {e}")
                    self._mfu_warned = True
        if self.device.type == "cuda":
            rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        if out["skipped"]:
            rec["skipped"] = True
        rec.update(out.get("metrics", {}))
        return rec

    def _log_eval(self) -> dict:
        ev = self.evaluate()
        if ev:
            self.metrics.write({"step": self.state.step, **ev})
            if self.rank == 0:
                log.info(f"step {self.state.step} | " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        return ev


def _float_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict's floating-point parameters and persistent buffers, under the same names, without
    calling state_dict(): TransformerEngine's `_extra_state` (not a float tensor; in older TE a BytesIO)
    would be serialised, with a device-to-host copy, for every layer at every EMA update."""
    out = {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        pre = prefix + "." if prefix else ""
        for n, t in mod.named_parameters(recurse=False, remove_duplicate=False):
            out[pre + n] = t
        for n, t in mod.named_buffers(recurse=False):
            if n not in mod._non_persistent_buffers_set:
                out[pre + n] = t
    return {k: v for k, v in out.items() if v is not None and v.is_floating_point()}


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (and save); a second one aborts."""

    def __init__(self):
        import threading
        self.requested = False
        self._prev = None
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
