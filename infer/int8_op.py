"""The C++ int8 operators, torch.compile-friendly: our int8 matmul `matmul(x, packed, n, isa)`
(infer/csrc/int8_matvec.cpp) and FBGEMM's int8 linear `linear_op()(x, key, n)` (infer/csrc/int8_linear.cpp).

Our matmul takes a plain int8 tensor (packed by infer.quant.pack_rows); `native_isas()` lists the instruction sets of
its kernels this CPU runs (avx512_vnni, avx2), empty without the C++ build (FBGEMM then does the work).

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
CSRC = [Path(__file__).resolve().parent / "csrc" / f for f in ("int8_linear.cpp", "int8_matvec.cpp")]
ISAS = {"avx512_vnni": 2, "avx2": 1}   # our kernels, best first, with the code furnace_int8::matmul takes

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
