"""Training options: one dataclass, filled from defaults < --config FILE < CLI flags.

SFT and DPO reuse it (with their own defaults; their few flags of their own: sft/common.py FinetuneOptions).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from model.config import KERNEL_IMPLS, PRESETS
from kernels.common import FurnaceError


def _opt(default, group: str, help: str):
    """A TrainOptions field with its --help line (what it does, its unit, its default in words) and group."""
    return field(default=default, metadata={"group": group, "help": help})


# The --help groups, in order (sft/common.py adds "fine-tuning"; a method may add its own).
GROUPS = ("data", "model", "length", "optimisation", "precision", "evaluation", "checkpoints", "logging")


@dataclass
class TrainOptions:
    preset: str = _opt("", "model", "model shape (see README's presets); default: tiny on CPU, 26m on CUDA")
    data: str = _opt("", "data", "token-shard folders from data/prepare.py, DIR[:weight],...; "
                     "default: the embedded Python-stdlib corpus (prepared on first use)")
    out: str = _opt("", "checkpoints", "run folder; default: runs/<preset>-<data name>, or -2, -3... when taken "
                    "(--resume without --out: the newest)")
    max_steps: int = _opt(0, "length", "optimizer steps; default: from --tokens, else 300 on CPU / 2000 on CUDA")
    tokens: int = _opt(0, "length", "train on about this many tokens (e.g. 2e9); default: use --max-steps")
    batch_size: int = _opt(0, "optimisation", "sequences per micro-batch per device; default: 8 on CPU, 32 on CUDA")
    seq_len: int = _opt(0, "optimisation", "tokens per sequence; default: 256 on CPU, 1024 on CUDA "
                        "(capped by the model's context)")
    grad_accum: int = _opt(1, "optimisation", "micro-batches per optimizer step; default: 1")
    lr: float = _opt(1e-3, "optimisation", "peak learning rate; default: 1e-3")
    min_lr: float = _opt(1e-4, "optimisation", "learning rate at the end of the schedule; default: 1e-4")
    warmup: int = _opt(0, "optimisation", "linear warm-up, in steps; default: min(100, 5%% of --max-steps)")
    schedule: str = _opt("cosine", "optimisation", "learning-rate decay after warm-up; default: cosine")
    wsd_decay: float = _opt(0.2, "optimisation", "fraction of the steps spent decaying with --schedule wsd; "
                            "default: 0.2")
    weight_decay: float = _opt(0.1, "optimisation", "AdamW weight decay (matrices only); default: 0.1")
    grad_clip: float = _opt(1.0, "optimisation", "clip the global gradient norm to this; 0 = no clipping; default: 1.0")
    z_loss: float = _opt(0.0, "optimisation", "weight of the z-loss (log-softmax normaliser squared) that keeps "
                         "logits small, e.g. 1e-4; default: 0 (off)")
    seed: int = _opt(1337, "optimisation", "seed for initial weights and data order; default: 1337")
    device: str = _opt("auto", "precision", "auto | cpu | cuda | cuda:N; default: auto (CUDA when present)")
    dtype: str = _opt("", "precision", "autocast precision; default: bf16 on CUDA, fp32 on CPU")
    fp8: bool = _opt(False, "precision", "FP8 matmuls in the transformer blocks (TransformerEngine, else torchao, "
                     "else BF16 with the reason); default: off")
    fp8_backend: str = _opt("auto", "precision", "which FP8 library; default: auto (TransformerEngine, then torchao)")
    fp8_strict: bool = _opt(False, "precision", "stop with an error instead of falling back from FP8; default: off")
    compile: bool = _opt(False, "precision", "torch.compile the model (first steps are slow while it compiles); "
                         "default: off")
    kernels: str = _opt("auto", "precision", "kernel implementation; default: auto (Triton on CUDA, PyTorch on CPU)")
    activation_checkpointing: bool = _opt(False, "precision", "recompute each block's activations in backward: "
                                          "less memory, ~30%% more compute; default: off")
    ema: float = _opt(0.0, "optimisation", "keep an exponential moving average of the weights with this decay "
                      "(e.g. 0.999), saved as ema.safetensors; default: 0 (off)")
    eval_every: int = _opt(-1, "evaluation", "validation loss (and a sample from a fixed prompt) every N steps; "
                           "0 = only at the end; default: -1 = automatic (~3%% of the training time)")
    eval_tokens: int = _opt(65536, "evaluation", "validation tokens of the final evaluation, and of each one with "
                            "--eval-every N (at most one pass over the validation split); default: 65536")
    save_every: int = _opt(0, "checkpoints", "checkpoint every N steps; default: 0 = only at the end (and on Ctrl-C)")
    keep_last: int = _opt(3, "checkpoints", "keep the newest N checkpoints; default: 3")
    keep_weights_only: bool = _opt(False, "checkpoints", "drop the trainer state (optimizer, ~2/3 of a checkpoint) "
                                   "from checkpoints older than the newest, keeping their weights; default: off")
    resume: bool = _opt(False, "checkpoints", "continue the run in --out (or the newest default run) from its "
                        "newest checkpoint; default: off")
    wandb: bool = _opt(False, "logging", "log to Weights & Biases (WANDB_MODE=offline works); default: off")
    wandb_project: str = _opt("furnace", "logging", "wandb project name; default: furnace")
    init: str = _opt("", "model", "start from these weights (checkpoint or run folder); default: random init")
    rope_scaling: str = _opt("", "model", "with --init: extend the context (none | linear | ntk | yarn); default: none")
    rope_factor: float = _opt(0.0, "model", "context extension factor for --rope-scaling; default: 0 = 2.0")
    peak_tflops: float = _opt(0.0, "logging", "dense BF16 peak of this device in TFLOP/s, for MFU; "
                              "default: 0 = the known device's figure")
    max_bad_steps: int = _opt(5, "optimisation", "stop after this many non-finite steps in a row; default: 5")
    log_every: int = _opt(10, "logging", "plain log line every N steps when not on a terminal (metrics.jsonl gets "
                          "every step); default: 10")
    sample_prompt: str = _opt("", "evaluation", "text the model continues at each evaluation (printed and saved "
                              "in samples.jsonl); \"none\" = no samples; default: the first line of a "
                              "validation document")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields that describe the run itself: a resumed run must agree on these (see checkpoint.check_out_dir).
# Everything else may change on --resume (logged): lr, min-lr, warmup, schedule, grad-clip, z-loss, max-steps /
# tokens, eval / save / log cadence, keep-last, max-bad-steps: the recovery from a diverged run is
# "--resume with a lower --lr". weight_decay stays: the optimizer state restores it.
RUN_DEFINING = ("preset", "data", "batch_size", "seq_len", "grad_accum", "weight_decay", "seed", "fp8", "init")

# The values a str option accepts ("": the device's default, not offered as a flag value).
_CHOICES = {"schedule": ("cosine", "wsd", "constant"), "dtype": ("", "bf16", "fp16", "fp32"), "kernels": KERNEL_IMPLS,
            "fp8_backend": ("auto", "te", "torchao"), "preset": ("", *PRESETS),
            "rope_scaling": ("", "none", "linear", "ntk", "yarn")}


def read_config_file(path: str) -> dict:
    """JSON, YAML or TOML holding TrainOptions fields (dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise FurnaceError(f"--config {path}: no such file")
    if p.suffix not in (".json", ".yaml", ".yml", ".toml"):
        raise FurnaceError(f"--config {path}: expected a .json, .yaml/.yml or .toml file")
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise FurnaceError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml)") from None
    try:
        if p.suffix == ".toml":
            import tomllib
            raw = tomllib.loads(p.read_text())
        else:
            raw = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except Exception as e:  # parser errors of three libraries, or a file that is not text
        raise FurnaceError(f"--config {path}: could not parse ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise FurnaceError(f"--config {path}: expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in raw.items()}


def add_arguments(ap: argparse.ArgumentParser, defaults: TrainOptions | None = None, *,
                  exclude: tuple[str, ...] = (), help_overrides: dict[str, str] | None = None) -> dict:
    """One flag per TrainOptions field (--max-steps, --fp8, ...), in GROUPS, each with its help line.
    `exclude`: fields this command refuses (not listed; options_from_args refuses them in a config file too).
    `help_overrides`: a command's own help line for a field whose default it changes. Defaults are applied
    later so that --config values are overridden only by flags the user actually gave. Returns the groups
    (name -> argparse group) so a command can add its own flags to one."""
    ap.add_argument("--config", metavar="FILE",
                    help="JSON/YAML/TOML file of these options (names with - or _); flags given override it; "
                         "examples in configs/; default: none")
    groups = {g: ap.add_argument_group(g) for g in GROUPS}
    for f in dataclasses.fields(TrainOptions):
        if f.name in exclude:
            continue
        flag, g = "--" + f.name.replace("_", "-"), groups[f.metadata["group"]]
        text = (help_overrides or {}).get(f.name) or f.metadata["help"]
        if f.type == "bool":
            g.add_argument(flag, action="store_true", default=None, help=text)
        else:
            typ = {"int": _count, "float": float, "str": str}[f.type]
            kw = {"choices": [c for c in _CHOICES[f.name] if c]} if f.name in _CHOICES else {"metavar": METAVAR[f.type]}
            g.add_argument(flag, type=typ, default=None, help=text, **kw)
    ap.set_defaults(_excluded_options=tuple(exclude))
    return groups


METAVAR = {"int": "N", "float": "X", "str": "S"}


def _count(text: str) -> int:
    """Integers, also written as 2e9 or 2_000_000."""
    try:
        v = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v != int(v):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(v)


def check_file_value(path: str, key: str, value, typ: str):
    """A config-file value checked like its flag: the type of the field (an integer may be written 2e9 or
    "2_000_000", a float may be an integer); FurnaceError naming the file and key otherwise."""
    expected = {"bool": "true or false", "int": "an integer (e.g. 300 or 2e9)", "float": "a number (e.g. 3e-4)",
                "str": "a string"}[typ]
    if (typ == "bool") == isinstance(value, bool) and not isinstance(value, (list, dict, type(None))):
        try:
            if typ == "int":
                return value if isinstance(value, int) else _count(str(value))
            if typ == "float":
                return float(value)
            if typ == "bool" or isinstance(value, str):
                return value
        except (ValueError, argparse.ArgumentTypeError):
            pass
    raise FurnaceError(f"--config {path}: {key} = {value!r}: expected {expected}")


def options_from_args(args: argparse.Namespace, defaults: TrainOptions | None = None) -> TrainOptions:
    """defaults < --config FILE < flags given, type- and range-checked; errors name the flag, or the file
    and key a value came from."""
    values, file_vals = (defaults or TrainOptions()).to_dict(), {}
    if getattr(args, "config", None):
        file_vals = read_config_file(args.config)
        unknown = sorted(set(file_vals) - set(values))
        if unknown:
            raise FurnaceError(f"--config {args.config}: unknown options {unknown} (see --help for the names)")
        refused = sorted(set(file_vals) & set(getattr(args, "_excluded_options", ())))
        if refused:
            raise FurnaceError(f"--config {args.config}: {', '.join(refused)} is not an option of this command; "
                               f"remove it from the file")
        types = {f.name: f.type for f in dataclasses.fields(TrainOptions)}
        file_vals = {k: check_file_value(args.config, k, v, types[k]) for k, v in file_vals.items()}
    flags = {k: getattr(args, k) for k in values if getattr(args, k, None) is not None}
    opts = TrainOptions(**{**values, **file_vals, **flags})
    validate(opts, {k: f"--config {args.config}: {k}" for k in file_vals if k not in flags})
    return opts


def validate(o: TrainOptions, origin: dict[str, str] | None = None) -> None:
    """Range checks; `origin` names where a value came from (a config file's key) when not from its flag."""
    origin = origin or {}

    def name(f: str) -> str:
        return origin.get(f, "--" + f.replace("_", "-"))

    for f, choices in _CHOICES.items():
        if getattr(o, f) not in choices:
            raise FurnaceError(f"{name(f)} {getattr(o, f)!r}: expected one of {', '.join(c for c in choices if c)}")
    for f in ("max_steps", "tokens", "batch_size", "seq_len", "save_every", "warmup", "eval_tokens", "log_every",
              "weight_decay", "grad_clip", "z_loss", "rope_factor", "peak_tflops"):
        if not getattr(o, f) >= 0:  # (NaN too)
            raise FurnaceError(f"{name(f)} {getattr(o, f)}: expected >= 0")
    if o.eval_every < -1:
        raise FurnaceError(f"{name('eval_every')} {o.eval_every}: expected N >= 0 (or -1 = automatic)")
    for f in ("grad_accum", "keep_last", "max_bad_steps"):
        if getattr(o, f) < 1:
            raise FurnaceError(f"{name(f)} {getattr(o, f)}: expected >= 1")
    if not o.lr > 0 or not 0 <= o.min_lr <= o.lr:
        raise FurnaceError(f"{name('lr')} {o.lr} / {name('min_lr')} {o.min_lr}: expected 0 <= min-lr <= lr and lr > 0")
    if not 0.0 <= o.wsd_decay <= 1.0:
        raise FurnaceError(f"{name('wsd_decay')} {o.wsd_decay}: expected a fraction in [0, 1]")
    if not 0.0 <= o.ema < 1.0:
        raise FurnaceError(f"{name('ema')} {o.ema}: expected a decay in [0, 1), e.g. 0.999")
    if o.rope_scaling not in ("", "none") and not o.init:
        raise FurnaceError(f"{name('rope_scaling')} {o.rope_scaling}: extends a trained model's context: "
                           f"use it with --init CKPT")
