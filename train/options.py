"""Training options: one dataclass, filled from defaults < --config FILE < CLI flags.

SFT and DPO reuse it (with their own defaults; their few flags of their own: sft/common.py FinetuneOptions).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from model.config import KERNEL_IMPLS, PRESETS
from kernels.common import FurnaceError

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("bf16", "fp16", "fp32")
FP8_BACKENDS = ("auto", "te", "torchao")


@dataclass
class TrainOptions:
    preset: str = ""               # "" = tiny on CPU, 26m on CUDA
    data: str = ""                 # DIR[:weight],... ; empty = the embedded default corpus
    out: str = ""                  # empty = runs/<preset>-<data name>[-N]
    max_steps: int = 0             # 0 = derive from --tokens, else the device default
    tokens: int = 0
    batch_size: int = 0            # 0 = device default
    seq_len: int = 0               # 0 = device default (capped by the model's context)
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 0                # steps; 0 = min(100, 5% of max_steps)
    schedule: str = "cosine"
    wsd_decay: float = 0.2         # fraction of steps spent decaying in the WSD schedule
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    z_loss: float = 0.0
    seed: int = 1337
    device: str = "auto"
    dtype: str = ""                # "" = bf16 on CUDA, fp32 on CPU
    fp8: bool = False
    fp8_backend: str = "auto"
    fp8_strict: bool = False
    compile: bool = False
    kernels: str = "auto"
    activation_checkpointing: bool = False
    ema: float = 0.0               # EMA decay (e.g. 0.999); 0 = off
    eval_every: int = 0            # 0 = only at the end
    eval_tokens: int = 65536
    save_every: int = 0            # 0 = only at the end
    keep_last: int = 3
    resume: bool = False
    wandb: bool = False
    wandb_project: str = "furnace"
    init: str = ""                 # start from these weights (checkpoint or run dir)
    rope_scaling: str = ""         # with --init: extend context (none|linear|ntk|yarn)
    rope_factor: float = 0.0
    peak_tflops: float = 0.0       # override the device's dense BF16 peak for MFU
    max_bad_steps: int = 5         # consecutive non-finite steps before aborting
    log_every: int = 10            # console line every N steps (metrics.jsonl gets every step)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields that describe the run itself: a resumed run must agree on these (see checkpoint.check_out_dir).
# Everything else may change on --resume (logged): lr, min-lr, warmup, schedule, grad-clip, z-loss, max-steps /
# tokens, eval / save / log cadence, keep-last, max-bad-steps: the recovery from a diverged run is
# "--resume with a lower --lr". weight_decay stays: the optimizer state restores it.
RUN_DEFINING = ("preset", "data", "batch_size", "seq_len", "grad_accum", "weight_decay", "seed", "fp8", "init")

_CHOICES = {"schedule": SCHEDULES, "dtype": DTYPES + ("",), "fp8_backend": FP8_BACKENDS,
            "kernels": KERNEL_IMPLS, "preset": tuple(PRESETS) + ("",), "rope_scaling": ("", "none", "linear", "ntk", "yarn")}


def read_config_file(path: str) -> dict:
    """JSON, YAML or TOML holding TrainOptions fields (dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise FurnaceError(f"--config {path}: no such file")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            raw = json.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise FurnaceError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml)") from None
            raw = yaml.safe_load(text)
        elif p.suffix == ".toml":
            import tomllib
            raw = tomllib.loads(text)
        else:
            raise FurnaceError(f"--config {path}: expected a .json, .yaml/.yml or .toml file")
    except FurnaceError:
        raise
    except Exception as e:  # parser errors of three libraries
        raise FurnaceError(f"--config {path}: could not parse ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise FurnaceError(f"--config {path}: expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in raw.items()}


def add_arguments(ap: argparse.ArgumentParser, defaults: TrainOptions | None = None) -> None:
    """One flag per TrainOptions field (--max-steps, --fp8, ...). Defaults are applied later so that
    --config values are overridden only by flags the user actually gave."""
    defaults = defaults or TrainOptions()
    ap.add_argument("--config", help="JSON/YAML/TOML file with the same fields; CLI flags override it")
    for f in dataclasses.fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            ap.add_argument(flag, action="store_true", default=None, help="(default: off)")
        else:
            kw = {"choices": [c for c in _CHOICES[f.name] if c]} if f.name in _CHOICES else {}
            typ = _count if isinstance(default, int) else type(default)
            ap.add_argument(flag, type=typ, default=None, help=f"(default: {default!r})", **kw)


def _count(text: str) -> int:
    """Integers, also written as 2e9 or 2_000_000."""
    try:
        v = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v != int(v):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(v)


def options_from_args(args: argparse.Namespace, defaults: TrainOptions | None = None) -> TrainOptions:
    defaults = defaults or TrainOptions()
    values = defaults.to_dict()
    if getattr(args, "config", None):
        file_vals = read_config_file(args.config)
        unknown = sorted(set(file_vals) - set(values))
        if unknown:
            raise FurnaceError(f"--config {args.config}: unknown options {unknown}")
        values.update(file_vals)
    for k in values:
        v = getattr(args, k, None)
        if v is not None:
            values[k] = v
    opts = TrainOptions(**values)
    validate(opts)
    return opts


def validate(o: TrainOptions) -> None:
    for name, choices in _CHOICES.items():
        if getattr(o, name) not in choices:
            raise FurnaceError(f"--{name.replace('_', '-')} {getattr(o, name)!r}: expected one of "
                               f"{', '.join(c for c in choices if c)}")
    for name in ("max_steps", "tokens", "batch_size", "seq_len", "eval_every", "save_every", "warmup"):
        if getattr(o, name) < 0:
            raise FurnaceError(f"--{name.replace('_', '-')} {getattr(o, name)}: expected >= 0")
    if o.grad_accum < 1:
        raise FurnaceError(f"--grad-accum {o.grad_accum}: expected >= 1")
    if o.keep_last < 1:
        raise FurnaceError(f"--keep-last {o.keep_last}: expected >= 1")
    if not o.lr > 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise FurnaceError(f"--lr {o.lr} / --min-lr {o.min_lr}: expected 0 <= min-lr <= lr and lr > 0")
    if not 0.0 <= o.ema < 1.0:
        raise FurnaceError(f"--ema {o.ema}: expected a decay in [0, 1), e.g. 0.999")
    if o.rope_scaling not in ("", "none") and not o.init:
        raise FurnaceError("--rope-scaling extends a trained model's context: use it with --init CKPT")
