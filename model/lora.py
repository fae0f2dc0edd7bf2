"""LoRA adapters (Hu et al. 2021) on the model's Linear layers, adapter-only checkpoints and merging.

    y = base_layer(x) + (dropout(x) @ A.T @ B.T) * alpha / r       A: (r, in), B: (out, r)
A ~ Kaiming-uniform (a = sqrt(5), as nn.Linear and PEFT), B = 0: at step 0 the adapted model IS the base.
The base weights are frozen (requires_grad False), so the optimizer (train/optim.py takes only trainable
parameters) holds state for the adapters alone. A and B stay out of FP8 and are plain matmuls; the frozen
`base_layer` is an ordinary nn.Linear that FP8 conversion may swap.

An adapter checkpoint folder holds config.json (the model's shape), adapter_config.json (rank, alpha,
dropout, targets, and the base checkpoint's path and sha256) and adapter.safetensors (A and B of each
target, plain names such as `layers.0.attn.q_proj.lora_A`). model.io.load opens it as a full model: it
loads the base from the recorded path, checks its hash, and merges.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.common import FurnaceError

# --lora-targets name -> the module inside each block
TARGETS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter.safetensors"


@dataclass
class LoRAConfig:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    base: str = ""           # the base checkpoint folder (absolute path)
    base_sha256: str = ""    # sha256 of its weights file (model.io.weights_file)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


def parse_targets(text: str) -> list[str]:
    """'q,k,v,o' -> ['q', 'k', 'v', 'o']; an unknown name is bad input."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise FurnaceError(f"--lora-targets {text!r}: unknown target {', '.join(bad) or '(none)'}; expected a "
                           f"comma-separated subset of {','.join(TARGETS)}")
    return list(dict.fromkeys(names))


def validate(rank: int, alpha: float, dropout: float, targets: str) -> None:
    """The --lora-* flags (rank 0 = LoRA off: nothing else is checked)."""
    if rank < 0:
        raise FurnaceError(f"--lora-rank {rank}: expected a positive rank such as 8 or 16 (0 = no LoRA)")
    if rank == 0:
        return
    if not alpha > 0:
        raise FurnaceError(f"--lora-alpha {alpha}: expected > 0 (e.g. 16; the adapter scale is alpha / rank)")
    if not 0.0 <= dropout < 1.0:
        raise FurnaceError(f"--lora-dropout {dropout}: expected a probability in [0, 1)")
    parse_targets(targets)


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update. `enabled` False gives the base layer's output."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise FurnaceError(f"--lora-rank {rank}: expected a positive rank")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x):
        y = self.base_layer(x)                                               # (..., out)
        if not self.enabled:
            return y
        a = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)    # (..., r)
        return y + F.linear(a, self.lora_B).to(y.dtype) * self.scale         # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scale: (out, r) @ (r, in) -> (out, in), the update merging adds to the base weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{name of the replaced Linear ('layers.0.attn.q_proj'): its LoRALinear}, wrappers' names stripped."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out[_plain(n)] = m
    return out


def _plain(name: str) -> str:
    for w in ("_orig_mod.", "module.", "_checkpoint_wrapped_module."):
        name = name.replace(w, "")
    return name


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze every parameter of `model` (a GPT) and put adapters on cfg.targets in every block; records
    cfg as `model.lora`. The same seed gives the same A matrices."""
    if cfg.rank <= 0:
        raise FurnaceError(f"--lora-rank {cfg.rank}: expected a positive rank")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.layers:
        for t in cfg.targets:
            parent_name, _, child = TARGETS[t].rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), cfg.rank, cfg.alpha, cfg.dropout))
    model.lora = cfg
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{'layers.0.attn.q_proj.lora_A': (r, in), '...lora_B': (out, r), ...} detached, contiguous."""
    sd = {}
    for n, m in lora_layers(model).items():
        sd[f"{n}.lora_A"] = m.lora_A.detach().contiguous()
        sd[f"{n}.lora_B"] = m.lora_B.detach().contiguous()
    return sd


@torch.no_grad()
def load_adapter_weights(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    layers = lora_layers(model)
    expected = {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    if set(sd) != expected:
        miss, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise FurnaceError(f"{source}: adapter weights do not match adapter_config.json: missing {miss[:3]}, "
                           f"unexpected {extra[:3]}")
    for n, m in layers.items():
        for ab in "AB":
            dst, src = getattr(m, f"lora_{ab}"), sd[f"{n}.lora_{ab}"]
            if dst.shape != src.shape:
                raise FurnaceError(f"{source}: {n}.lora_{ab} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(src)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model's outputs (DPO's reference policy) from the same weights: no second copy."""
    layers = list(lora_layers(model).values())
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain GPT state dict (names as without LoRA) with W + B @ A * scale in each target."""
    layers = lora_layers(model)
    sd = {}
    for name, t in model.state_dict().items():
        name = _plain(name)
        if name.endswith(".lora_A") or name.endswith(".lora_B") or name.endswith("_extra_state"):
            continue
        owner = name.rsplit(".", 2)[0] if ".base_layer." in name else None
        if owner in layers:
            t = (t.float() + layers[owner].delta_weight()).to(t.dtype)
            name = name.replace(".base_layer.", ".")
        sd[name] = t
    return sd


def merge(model: nn.Module) -> nn.Module:
    """A new plain GPT (no adapters) whose weights are the merged ones; `model` is left as it is."""
    from model.gpt import GPT
    with torch.device("meta"):
        plain = GPT(model.config)
    sd = merged_state_dict(model)
    plain.load_state_dict(sd, strict=False, assign=True)
    if model.config.tie_embeddings:
        plain.lm_head.weight = plain.embed.weight
    plain.rope_cos, plain.rope_sin = model.rope_cos, model.rope_sin
    return plain.train(model.training)


# ---- adapter checkpoints ------------------------------------------------------------------------------
def is_adapter_checkpoint(d: Path) -> bool:
    return (Path(d) / ADAPTER_CONFIG).is_file()


def save_adapter(model: nn.Module, directory: Path) -> Path:
    """config.json (the model's shape), adapter_config.json (LoRA settings + base reference),
    adapter.safetensors (A and B only)."""
    from safetensors.torch import save_file

    from model.fileio import atomic_path, atomic_write
    d = Path(directory)
    atomic_write(d / "config.json", json.dumps(model.config.to_dict(), indent=2) + "\n")
    atomic_write(d / ADAPTER_CONFIG, json.dumps({"format": "furnace-lora", **model.lora.to_dict()}, indent=2) + "\n")
    with atomic_path(d / ADAPTER_WEIGHTS) as tmp:
        save_file({k: v.cpu() for k, v in adapter_state_dict(model).items()}, str(tmp),
                  metadata={"format": "pt", "furnace": "lora"})
    return d


def read_adapter_config(ckpt: Path) -> LoRAConfig:
    from model.fileio import read_json_object
    f = Path(ckpt) / ADAPTER_CONFIG
    raw = read_json_object(f, "LoRA adapter settings")
    raw.pop("format", None)
    try:
        return LoRAConfig(**raw)
    except TypeError as e:
        raise FurnaceError(f"{f}: not a LoRA adapter config ({e})") from None


def check_base(cfg: LoRAConfig, ckpt: Path) -> Path:
    """The base checkpoint named by an adapter checkpoint, after checking it is there and unchanged."""
    from model.fileio import sha256_file
    from model.io import weights_file
    base = Path(cfg.base)
    if not base.is_dir() or not weights_file(base).is_file():
        raise FurnaceError(f"adapter {ckpt}: its base checkpoint {base} is gone (moved or deleted); put it back, "
                           f"or merge the adapter where the base exists (python sft/merge_lora.py)")
    got = sha256_file(weights_file(base))
    if got != cfg.base_sha256:
        raise FurnaceError(f"adapter {ckpt}: base checkpoint {base} has changed (sha256 {got[:12]}..., the adapter "
                           f"was trained on {cfg.base_sha256[:12]}...); the adapter only fits the original weights")
    return base


def load_adapted(ckpt: Path, device="cpu") -> nn.Module:
    """The base model (checked) with this checkpoint's adapters applied, unmerged, in eval mode."""
    from safetensors.torch import load_file

    from model.fileio import verify_checksums
    from model.io import load
    ckpt = Path(ckpt)
    cfg = read_adapter_config(ckpt)
    base = check_base(cfg, ckpt)
    model = load(base, device="cpu").train()
    apply_lora(model, cfg)
    verify_checksums(ckpt, names=("config.json", ADAPTER_CONFIG, ADAPTER_WEIGHTS))  # a training checkpoint's
    try:
        sd = load_file(str(ckpt / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises several types for truncated files
        raise FurnaceError(f"{ckpt / ADAPTER_WEIGHTS}: unreadable or truncated ({type(e).__name__}: {e})") from None
    for k, t in sd.items():
        if not bool(torch.isfinite(t).all()):
            raise FurnaceError(f"{ckpt / ADAPTER_WEIGHTS}: {k} holds NaN or inf (saved from a diverged run?); "
                               f"use an earlier checkpoint of that run")
    load_adapter_weights(model, sd, str(ckpt / ADAPTER_WEIGHTS))
    return model.to(device).eval()
