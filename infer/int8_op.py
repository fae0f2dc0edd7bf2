"""The C++ CPU operators of decoding, torch.compile-friendly: our int8 matmul `matmul(x, packed, n, isa)`
(infer/csrc/int8_matvec.cpp), FBGEMM's int8 linear `linear_op()(x, key, n)` (infer/csrc/int8_linear.cpp) and the
one-query attention of a decode step `decode_attention(q, k, v, isa)` (infer/csrc/decode_attention.cpp).

Our matmul takes a plain int8 tensor (packed by infer.quant.pack_rows); `native_isas()` lists the instruction sets of
its kernels this CPU runs (avx512_vnni, avx2), empty without the C++ build (FBGEMM then does the work).
`attention_isa()`: the decode attention's instruction set here (None without the C++ build: SDPA then).

FBGEMM keeps packed int8 weights in a TorchScript object that torch.compile cannot pass through a graph, so the
packed weights live in numbered slots (`hold` -> key, `release(key)`) and the operator takes the key. Two
implementations of one schema, chosen once per process and logged in one line:
- C++ (`infer/csrc/int8_linear.cpp`), built on first use with torch.utils.cpp_extension (a C++ compiler and
  ninja; a few seconds, cached under ~/.cache/torch_extensions): no Python per call, so a compiled decode step
  (infer.decode) goes from its C++ wrapper straight into FBGEMM.
- Python (a torch.library custom op over a dict of slots): the same numbers, about 20 us more per call. Used
  when the build fails or FURNACE_NO_CPP_OPS=1.
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("furnace")
CSRC = [Path(__file__).resolve().parent / "csrc" / f
        for f in ("int8_linear.cpp", "int8_matvec.cpp", "decode_attention.cpp")]
ISAS = {"avx512_vnni": 2, "avx2": 1}   # our kernels, best first, with the code furnace_int8::matmul takes
ATTENTION_ISAS = {"avx512": 2, "avx2": 1, "portable": 0}   # furnace_int8::decode_attention's, the same codes

_py_slots: dict[int, object] = {}
_py_keys = itertools.count()


@torch.library.custom_op("furnace::int8_linear_py", mutates_args=())
def _linear_py(x: torch.Tensor, key: int, n: int) -> torch.Tensor:
    """x (M, K) fp32 -> (M, n) fp32 through the packed weights in slot `key`."""
    return torch.ops.quantized.linear_dynamic(x, _py_slots[key], False)


@_linear_py.register_fake
def _(x, key, n):
    return x.new_empty(x.shape[0], n)


def _fake_linear(x, key, n):
    return x.new_empty(x.shape[0], n)


def _fake_matmul(x, w, n, isa):
    return x.new_empty(x.shape[0], n)


def _fake_attention(q, k, v, isa):
    return q.new_empty(q.shape)


@functools.lru_cache(maxsize=None)
def backend() -> str:
    """'cpp' when the C++ operator builds and loads, else 'python' (logged once with the reason)."""
    if os.environ.get("FURNACE_NO_CPP_OPS", "") not in ("", "0"):
        reason = "FURNACE_NO_CPP_OPS is set"
    else:
        try:
            from torch.utils.cpp_extension import load  # noqa: PLC0415
            load(name="furnace_int8", sources=[str(c) for c in CSRC], is_python_module=False, extra_cflags=["-O2"])
            torch.library.register_fake("furnace_int8::linear")(_fake_linear)
            torch.library.register_fake("furnace_int8::matmul")(_fake_matmul)
            torch.library.register_fake("furnace_int8::decode_attention")(_fake_attention)
            log.info("int8: FBGEMM through the furnace_int8 C++ operator")
            return "cpp"
        except Exception as e:  # no compiler or ninja, a header change in another PyTorch, ...
            first = (str(e).strip().splitlines() or [""])[0][:120]
            reason = f"{type(e).__name__}: {first}"
    log.info(f"int8: C++ operator unavailable ({reason}) -> Python operator (about 20 us more per linear call)")
    return "python"


def hold(packed) -> int:
    """Keep FBGEMM packed weights in a slot; returns its key."""
    if backend() == "cpp":
        return int(torch.ops.furnace_int8.hold(packed))
    key = next(_py_keys)
    _py_slots[key] = packed
    return key


def release(key: int) -> None:
    if backend() == "cpp":
        torch.ops.furnace_int8.release(key)
    else:
        _py_slots.pop(key, None)


def linear_op():
    """The operator (x (M, K) fp32, key, n) -> (M, n) fp32 of this process's backend."""
    return torch.ops.furnace_int8.linear.default if backend() == "cpp" else torch.ops.furnace.int8_linear_py.default


@functools.lru_cache(maxsize=None)
def native_isas() -> tuple[str, ...]:
    """Instruction sets of our int8 matmul that this CPU runs, best first; () without the C++ operators."""
    if backend() != "cpp":
        return ()
    level = int(torch.ops.furnace_int8.cpu_isa())
    return tuple(name for name, code in ISAS.items() if code <= level)


def matmul(x: torch.Tensor, packed: torch.Tensor, n: int, isa: str) -> torch.Tensor:
    """x (M, K) fp32 -> (M, n) fp32 with weights packed by infer.quant.pack_rows, on `isa`'s kernel."""
    return torch.ops.furnace_int8.matmul.default(x, packed, n, ISAS[isa])


@functools.lru_cache(maxsize=None)
def attention_isas() -> tuple[str, ...]:
    """Instruction sets of our decode attention that this CPU runs, best first (the int8 matmul's detection: avx512
    with AVX-512 VNNI, avx2 with AVX2 + FMA, portable always); () without the C++ operators."""
    if backend() != "cpp":
        return ()
    level = int(torch.ops.furnace_int8.cpu_isa())
    return tuple(name for name, code in ATTENTION_ISAS.items() if code <= level)


@functools.lru_cache(maxsize=None)
def attention_isa() -> str | None:
    """The decode attention's instruction set for this process (logged once); None: SDPA (no C++ operators)."""
    isas = attention_isas()
    if not isas:
        log.info("attention: one-query decode steps through SDPA (no C++ operators)")
        return None
    log.info(f"attention: one-query decode steps through our C++ kernel ({isas[0]}); prefill and batched rows "
             "through SDPA")
    return isas[0]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, isa: str) -> torch.Tensor:
    """q (B, H, hd) fp32 against all T positions of k, v (B, T, Hkv, hd) fp32 (a cache's views, read in place; GQA:
    query head h uses kv head h // (H // Hkv)) -> (B, H, hd): SDPA's result for one query, on `isa`'s kernel."""
    return torch.ops.furnace_int8.decode_attention.default(q, k, v, ATTENTION_ISAS[isa])
