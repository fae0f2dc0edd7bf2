"""Model configuration: one dataclass and the named presets.

Parameter counts per preset are listed in the README and checked in tests/test_model.py
against a hand formula.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kernels.common import FurnaceError

ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")
KERNEL_IMPLS = ("auto", "torch", "triton", "liger")


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int = 2           # grouped-query attention: n_head % n_kv_head == 0
    ffn_hidden: int = 704        # SwiGLU hidden width
    max_seq_len: int = 512       # context length the model (and its RoPE tables) supports
    rope_theta: float = 10000.0
    rope_scaling: str = "none"   # none | linear | ntk | yarn
    rope_factor: float = 1.0     # context extension factor for the scaling above
    rope_original_max_seq_len: int = 0  # pre-extension context (linear/yarn); 0 = max_seq_len
    norm_eps: float = 1e-6
    qk_norm: bool = False        # RMSNorm on q and k per head before RoPE
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    init_std: float = 0.02
    # Which kernel implementation runs (auto | torch | triton | liger, see kernels/README.md): a choice of
    # this process, not part of the model, so never saved (to_dict leaves it out; from_dict ignores it).
    kernels: str = "auto"

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        def bad(msg):
            raise FurnaceError(f"invalid model config: {msg}")

        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "ffn_hidden", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"{name}={v!r}, expected a positive integer")
        if self.n_embd % self.n_head:
            bad(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            bad(f"head_dim={self.head_dim} must be even for RoPE")
        if self.n_head % self.n_kv_head:
            bad(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.rope_scaling not in ROPE_SCALINGS:
            bad(f"rope_scaling={self.rope_scaling!r}, expected one of {', '.join(ROPE_SCALINGS)}")
        if self.rope_factor < 1.0:
            bad(f"rope_factor={self.rope_factor}, expected >= 1")
        if self.kernels not in KERNEL_IMPLS:
            bad(f"kernels={self.kernels!r}, expected one of {', '.join(KERNEL_IMPLS)}")

    def to_dict(self) -> dict:
        """The model's definition, as saved in config.json (without the runtime `kernels` choice)."""
        d = dataclasses.asdict(self)
        del d["kernels"]
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"kernels"}
        d = {k: v for k, v in d.items() if k != "kernels"}  # older checkpoints saved the process's choice
        unknown = sorted(set(d) - known)
        if unknown:
            raise FurnaceError(f"{source}: unknown model config keys {unknown}; expected keys from {sorted(known)}")
        return cls(**d)

    def replace(self, **kw) -> "GPTConfig":
        return dataclasses.replace(self, **kw)


def _swiglu_hidden(d: int, multiple_of: int = 64) -> int:
    """Llama/MiniMind rule: 8/3 * d rounded up to a multiple."""
    h = int(8 * d / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


PRESETS: dict[str, GPTConfig] = {
    # CPU demo and tests: ~3.9M params with a 4096 vocab; trains at a useful speed on 2 cores.
    "tiny": GPTConfig(vocab_size=4096, n_layer=4, n_embd=256, n_head=4, n_kv_head=2,
                      ffn_hidden=_swiglu_hidden(256), max_seq_len=512),
    # MiniMind2-Small shape.
    "26m": GPTConfig(vocab_size=6400, n_layer=8, n_embd=512, n_head=8, n_kv_head=2,
                     ffn_hidden=_swiglu_hidden(512), max_seq_len=2048, rope_theta=1e6),
    # MiniMind2 shape.
    "104m": GPTConfig(vocab_size=6400, n_layer=16, n_embd=768, n_head=8, n_kv_head=2,
                      ffn_hidden=_swiglu_hidden(768), max_seq_len=2048, rope_theta=1e6),
    # Elite-112M: 112.1M params, tied.
    "112m": GPTConfig(vocab_size=49152, n_layer=12, n_embd=768, n_head=12, n_kv_head=3,
                      ffn_hidden=2048, max_seq_len=2048),
    # GPT-2-small scale (nanoGPT / llm.c comparisons), full multi-head attention.
    "124m": GPTConfig(vocab_size=50304, n_layer=12, n_embd=768, n_head=12, n_kv_head=12,
                      ffn_hidden=2048, max_seq_len=1024),
    "0.5b": GPTConfig(vocab_size=49152, n_layer=16, n_embd=1536, n_head=24, n_kv_head=8,
                      ffn_hidden=4096, max_seq_len=4096),
    "1b": GPTConfig(vocab_size=49152, n_layer=20, n_embd=2048, n_head=32, n_kv_head=8,
                    ffn_hidden=_swiglu_hidden(2048, 256), max_seq_len=4096),
    "1.2b": GPTConfig(vocab_size=49152, n_layer=22, n_embd=2048, n_head=16, n_kv_head=8,
                      ffn_hidden=8192, max_seq_len=8192, rope_theta=500000.0),
}


def get_preset(name: str) -> GPTConfig:
    if name not in PRESETS:
        raise FurnaceError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
