"""Inference precision: `quantize(model, mode)` with mode fp32 | bf16 | int8.

Decode is memory-bandwidth bound (every token reads every weight), so bytes per weight set the speed.

int8: every nn.Linear in the blocks and the LM head becomes an `Int8Linear` holding int8 weights with one
fp32 scale per output channel (symmetric, scale = max|w_row| / 127). The token embedding stays fp32 (a
lookup reads one row per token, not the matrix); with tied embeddings the LM head gets its own int8 copy.
Norm weights, RoPE tables and the KV cache stay fp32. q/k/v and gate/up are fused into one int8 linear each
(FusedAttention / FusedMLP swapped in): 4 calls per layer instead of 7.

CPU matmul kernel (bench/generate.py, infer/README.md): our int8 matmul (infer/csrc/int8_matvec.cpp, through
`infer.int8_op`): weights packed for VNNI by `pack_rows`, each activation row quantized once per call to int8
with its own symmetric scale, vpdpbusd (AVX-512 VNNI) or vpmaddubsw (AVX2) accumulation, chosen at run time for
the CPU. Without either (or without the C++ build): FBGEMM's dynamic int8 linear (`quantized::linear_dynamic`,
activations quantized per call to uint8 with one scale per tensor), then `_weight_int8pack_mm`, then
dequantize-and-matmul (logged once). FURNACE_INT8_KERNEL=avx512_vnni|avx2|fbgemm forces one.
Our kernel's packed weights are then moved into one mapping backed by 2 MB pages (`huge_page_weights`).
"""
from __future__ import annotations

import functools
import logging
import mmap
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from infer import int8_op
from kernels.common import FurnaceError, log_once
from model.gpt import GPT, MLP, Attention

log = logging.getLogger("furnace")
MODES = ("fp32", "bf16", "int8")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (N, K) float -> (int8 (N, K), fp32 scales (N,)) with w ~= q * scale[:, None]."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)             # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (N, K)
    return q, scale


def _quantized_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Quantized-tensor constructors warn that they are deprecated; they are FBGEMM's only entry point.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zp = torch.zeros(q.shape[0], dtype=torch.long)
        return torch._make_per_channel_quantized_tensor(q, scale.double(), zp, 0)


ROW_BLOCK = 64   # output rows per packed block of our int8 matmul (kRows in infer/csrc/int8_matvec.cpp)


def pack_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 q (N, K) and scales (N,) -> one int8 buffer for our int8 matmul: the weights as (Np/64, Kp/4, 64, 4)
    (N padded with zero rows to a multiple of 64, K to a multiple of 4; in each block of 64 rows, 4 consecutive k
    of a row are one 32-bit lane, vpdpbusd's operand), then the scales (Np fp32), then the row sums (Np int32)."""
    N, K = q.shape
    Np, Kp = -(-N // ROW_BLOCK) * ROW_BLOCK, -(-K // 4) * 4
    qp = torch.zeros(Np, Kp, dtype=torch.int8)
    qp[:N, :K] = q
    packed = qp.view(Np // ROW_BLOCK, ROW_BLOCK, Kp // 4, 4).permute(0, 2, 1, 3).contiguous()  # (Np/64, Kp/4, 64, 4)
    sp = torch.zeros(Np)
    sp[:N] = scale
    return torch.cat([packed.flatten(), sp.view(torch.int8), qp.sum(dim=1, dtype=torch.int32).view(torch.int8)])


KERNEL_CHOICES = ("auto", *int8_op.ISAS, "fbgemm")


@functools.lru_cache(maxsize=None)
def cpu_int8_backend() -> str:
    """The fastest int8 linear here: 'avx512_vnni' or 'avx2' (ours), else 'fbgemm', 'int8pack' or 'dequant'.
    FURNACE_INT8_KERNEL (auto | avx512_vnni | avx2 | fbgemm) forces one."""
    forced = os.environ.get("FURNACE_INT8_KERNEL", "auto") or "auto"
    if forced not in KERNEL_CHOICES:
        raise FurnaceError(f"FURNACE_INT8_KERNEL={forced}: expected one of {', '.join(KERNEL_CHOICES)}")
    isas = int8_op.native_isas()
    if forced in int8_op.ISAS and forced not in isas:
        raise FurnaceError(f"FURNACE_INT8_KERNEL={forced}: this CPU or build runs only "
                           f"{', '.join(isas) or 'none of our kernels'}; unset it or pick fbgemm")
    if forced == "auto" and isas or forced in isas:
        isa = forced if forced in isas else isas[0]
        log.info(f"int8: our int8 matmul, {isa} kernel (per-row int8 activations)"
                 + (" (FURNACE_INT8_KERNEL)" if forced != "auto" else ""))
        return isa
    try:
        w = torch.randn(8, 16)
        q, s = quantize_rows(w)
        packed = torch.ops.quantized.linear_prepack(_quantized_tensor(q, s), None)
        y = torch.ops.quantized.linear_dynamic(torch.randn(2, 16), packed, False)
        assert y.shape == (2, 8)
        log.info("int8: FBGEMM dynamic int8 linear (per-channel int8 weights)")
        return "fbgemm"
    except (RuntimeError, AttributeError, AssertionError, NotImplementedError) as e:
        reason = f"{type(e).__name__}: {str(e)[:80]}"
    try:
        q, s = quantize_rows(torch.randn(8, 16))
        torch._weight_int8pack_mm(torch.randn(2, 16, dtype=torch.bfloat16), q, s.bfloat16())
        log.info(f"int8: FBGEMM unavailable ({reason}) -> torch._weight_int8pack_mm with bf16 activations")
        return "int8pack"
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        log.info(f"int8: no int8 matmul kernel ({reason}; {type(e).__name__}) -> dequantize then fp32 matmul (slow)")
        return "dequant"


@functools.lru_cache(maxsize=None)
def cuda_int8_backend() -> str:
    """'int8pack' when torch._weight_int8pack_mm runs on CUDA, else 'dequant' (logged once)."""
    try:
        q, s = quantize_rows(torch.randn(8, 16))
        torch._weight_int8pack_mm(torch.randn(2, 16, dtype=torch.bfloat16, device="cuda"), q.cuda(),
                                  s.bfloat16().cuda())
        log.info("int8 (CUDA): torch._weight_int8pack_mm with bf16 activations")
        return "int8pack"
    except (RuntimeError, NotImplementedError) as e:
        log.info(f"int8 (CUDA): _weight_int8pack_mm unavailable ({type(e).__name__}) -> dequantize then matmul")
        return "dequant"


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T with int8 q (N, K) and per-output-channel fp32 scales (N,)."""

    def __init__(self, weight: torch.Tensor, backend: str | None = None):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        device = weight.device
        self.backend = backend or (cpu_int8_backend() if device.type == "cpu" else cuda_int8_backend())
        self.register_buffer("qweight", q.to(device))                       # (N, K) int8
        self.register_buffer("scale", scale.to(device))                     # (N,) fp32
        self._packed, self._key, self._op = None, None, None
        if self.backend in int8_op.ISAS:
            if self.backend not in int8_op.native_isas():              # also builds and loads the operators
                raise ValueError(f"Int8Linear: backend {self.backend!r} does not run here ({int8_op.native_isas()})")
            # A frozen Parameter, not a buffer: a compiled decode step keeps a tensor-match guard on every buffer
            # it reads, even with guard evaluation skipped (infer.decode): ~9% of a 26m token with buffers.
            self.packed = nn.Parameter(pack_rows(q, scale).to(device), requires_grad=False)   # (Np * (Kp + 8),) int8
        elif self.backend == "fbgemm":
            self._packed = torch.ops.quantized.linear_prepack(_quantized_tensor(q, scale), None)
            self._key, self._op = int8_op.hold(self._packed), int8_op.linear_op()  # see infer/int8_op.py

    def __del__(self):
        if getattr(self, "_key", None) is not None:
            try:
                int8_op.release(self._key)
            except Exception:  # noqa: BLE001 - interpreter shutdown: modules already torn down
                pass

    def __reduce_ex__(self, protocol):
        if self._key is None:                                               # plain tensors: copies as usual
            return super().__reduce_ex__(protocol)
        # A copy would share (and on deletion release) this module's slot: copy.copy, deepcopy and pickle refuse.
        raise TypeError("Int8Linear holds its FBGEMM weights in a slot and cannot be copied or pickled: copy or "
                        "save the float model, then quantize again")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)                                # (M, K)
        if self.backend in int8_op.ISAS:
            y = int8_op.matmul(x2.float(), self.packed, self.out_features, self.backend)   # (M, N) fp32
        elif self.backend == "fbgemm":
            y = self._op(x2.float(), self._key, self.out_features)           # (M, N) fp32
        elif self.backend == "int8pack":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight,
                                          self.scale.to(torch.bfloat16)).float()
        else:
            y = F.linear(x2.float(), self.qweight.float() * self.scale[:, None])
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


def _float_linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    lin.weight.data.copy_(weight)
    return lin


class FusedAttention(Attention):
    """Attention whose q|k|v is one linear (stacked rows: the same numbers; int8 scales are per row), and whose
    one-query decode steps on CPU (fp32) go through our C++ attention kernel (infer/int8_op.py) instead of SDPA."""

    def __init__(self, attn: Attention, make_linear):
        nn.Module.__init__(self)
        self.cfg, self.layer, self.o_proj = attn.cfg, attn.layer, attn.o_proj
        if attn.cfg.qk_norm:
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.qkv_proj = make_linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))  # (d+2kv, d)
        # avx512 | avx2 | portable, or None (SDPA): chosen once per process; tests set it per module.
        self.attention_isa = int8_op.attention_isa() if attn.o_proj.weight.device.type == "cpu" else None

    def project(self, x):
        kv_dim = self.cfg.n_kv_head * self.cfg.head_dim
        return self.qkv_proj(x).split([self.cfg.n_embd, kv_dim, kv_dim], dim=-1)   # (B, T, d), (B, T, kv) x 2

    def attend(self, q, k, v, doc_ids=None):
        B, T, H, hd = q.shape
        if (self.attention_isa is not None and T == 1 and doc_ids is None and q.device.type == "cpu"
                and q.dtype == k.dtype == torch.float32):
            y = int8_op.decode_attention(q.reshape(B, H, hd), k, v, self.attention_isa)   # (B, H, hd)
            return y.view(B, 1, H, hd)
        return super().attend(q, k, v, doc_ids)


class FusedMLP(MLP):
    """SwiGLU MLP whose gate|up is one linear."""

    def __init__(self, mlp: MLP, make_linear):
        nn.Module.__init__(self)
        self.cfg, self.down_proj = mlp.cfg, mlp.down_proj
        self.gate_up_proj = make_linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))   # (2 ffn, d)

    def gate_up(self, x):
        return self.gate_up_proj(x).chunk(2, dim=-1)                                     # (B, T, ffn) each


def fuse_projections(model: GPT, make_linear) -> GPT:
    """Swap in FusedAttention / FusedMLP: one call for q|k|v and one for gate|up instead of three and two."""
    with torch.no_grad():
        for block in model.layers:
            if not isinstance(block.attn, FusedAttention):
                block.attn, block.mlp = FusedAttention(block.attn, make_linear), FusedMLP(block.mlp, make_linear)
    return model


def quantize(model: GPT, mode: str) -> GPT:
    """Convert `model` in place for inference (q|k|v and gate|up fused in every mode): 'fp32', 'bf16' (weights and activations bf16;
    RoPE tables stay fp32) or 'int8' (see the module docstring). Returns the model (eval mode)."""
    if mode not in MODES:
        raise FurnaceError(f"--dtype {mode!r}: expected one of {', '.join(MODES)}")
    model.eval()
    if mode == "fp32":
        return fuse_projections(model.float(), _float_linear)
    if mode == "bf16":
        cos, sin = model.rope_cos, model.rope_sin
        model.to(torch.bfloat16)
        model.rope_cos, model.rope_sin = cos, sin
        return fuse_projections(model, _float_linear)
    model.float()
    fuse_projections(model, Int8Linear)
    for block in model.layers:
        block.attn.o_proj = Int8Linear(block.attn.o_proj.weight)
        block.mlp.down_proj = Int8Linear(block.mlp.down_proj.weight)
    # A tied head shares the embedding Parameter: quantize a copy of it, the embedding stays fp32.
    model.lm_head = Int8Linear(model.lm_head.weight)
    huge_page_weights(model)
    return model


HUGE_PAGE = 2 << 20
THP_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_weights(model: nn.Module) -> int:
    """Move the packed weights of every Int8Linear on our kernel into one anonymous mapping that the kernel is asked
    to back with 2 MB pages (madvise MADV_HUGEPAGE; Linux transparent huge pages in "madvise" or "always" mode).
    A decode step streams every weight once: with 4 KB pages a 112 MB model touches ~27k pages per token and the
    TLB misses cost about a fifth of one core's bandwidth (infer/README.md). Returns the bytes moved (0: nothing
    to move, FURNACE_NO_HUGE_PAGES=1, or no MADV_HUGEPAGE here). Same bytes, so the same results."""
    mods = [m for m in model.modules() if isinstance(m, Int8Linear) and m.backend in int8_op.ISAS
            and m.packed.device.type == "cpu"]
    if not mods or os.environ.get("FURNACE_NO_HUGE_PAGES", "") not in ("", "0") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    sizes = [-(-m.packed.numel() // 64) * 64 for m in mods]                # 64-byte aligned slots
    total = -(-sum(sizes) // HUGE_PAGE) * HUGE_PAGE
    # private (a shared anonymous mapping is shmem, whose huge pages are a separate, usually disabled, setting)
    try:
        region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # + room to align
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError as e:  # a kernel built without transparent huge pages refuses the advice (EINVAL)
        log_once(f"int8: packed weights stay in 4 KB pages (madvise MADV_HUGEPAGE: {e.strerror})")
        return 0
    buf = torch.frombuffer(region, dtype=torch.int8)                       # keeps `region` alive
    start = -buf.data_ptr() % HUGE_PAGE
    with torch.no_grad():
        for m, size in zip(mods, sizes):
            slot = buf[start:start + m.packed.numel()]
            slot.copy_(m.packed)
            m.packed = nn.Parameter(slot, requires_grad=False)
            start += size
    mode = THP_FILE.read_text().split("[")[-1].split("]")[0] if THP_FILE.is_file() else "unknown"
    log_once(f"int8: packed weights in a 2 MB-page mapping (transparent huge pages: {mode})")
    return sum(sizes)


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of matmul weights read per decoded token (the LM head included, the embedding lookup not)."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            total += m.qweight.numel() + m.scale.numel() * 4
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total
