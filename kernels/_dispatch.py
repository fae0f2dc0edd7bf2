"""Which implementation runs an op: the one place that resolves `impl=`.

impl = "torch"  : the PyTorch reference (the spec, the CPU path, the test oracle).
       "triton" : our Triton kernels. CUDA tensors need a working Triton; CPU tensors run through
                  Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) *before*
                  `kernels` is imported, because `@triton.jit` picks compiled vs interpreted when
                  the kernel is defined.
       "liger"  : liger-kernel's versions, for comparison (needs `pip install liger-kernel`).
       "auto"   : "triton" for CUDA tensors when Triton imports, else "torch".

Triton is imported here, guarded: on a machine without it `kernels` still imports, `@triton.jit`
becomes a stub, and only impl="triton" fails, with a message saying why.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from kernels.common import FurnaceError, log_once

log = logging.getLogger("furnace")

IMPLS = ("auto", "torch", "triton", "liger")

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = None
except ImportError as e:  # no triton: keep the package importable, fail only when triton is asked for
    TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"
    INTERPRETED = False

    class _NoTriton:
        """Stands in for `triton` so the kernel files still define their functions."""

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

    triton = _NoTriton()
    tl = None

# The mode every `@triton.jit` in this package is created in: the op files are imported right after this
# module, and Triton reads TRITON_INTERPRET when a kernel is defined.
INTERPRETED = TRITON_IMPORT_ERROR is None and os.environ.get("TRITON_INTERPRET", "0").lower() in (
    "1", "true", "on", "yes")


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve(impl: str, x: torch.Tensor, op: str) -> str:
    """Map impl (auto|torch|triton|liger) to the backend that runs `op` on tensor `x`."""
    if impl not in IMPLS:
        raise FurnaceError(f"kernels.{op}: impl={impl!r}, expected one of {', '.join(IMPLS)}")
    if impl == "auto":
        if x.is_cuda and TRITON_IMPORT_ERROR is None and not INTERPRETED:
            log_once("kernels: Triton (CUDA tensors)")
            return "triton"
        reason = ("CPU tensors" if not x.is_cuda else
                  f"Triton unavailable: {TRITON_IMPORT_ERROR}" if TRITON_IMPORT_ERROR else
                  "TRITON_INTERPRET=1 is set")
        log_once(f"kernels: PyTorch reference ({reason})")
        return "torch"
    if impl == "triton":
        if TRITON_IMPORT_ERROR is not None:
            raise FurnaceError(f"kernels.{op}: impl='triton' but Triton does not import ({TRITON_IMPORT_ERROR}); "
                               "install it (pip install triton) or use impl='torch'")
        if not x.is_cuda:
            if not _interpret_env():
                raise FurnaceError(f"kernels.{op}: impl='triton' on {x.device.type} tensors needs Triton's "
                                   "interpreter: set TRITON_INTERPRET=1 before importing kernels, move the "
                                   "tensors to CUDA, or use impl='torch'")
            if not INTERPRETED:
                raise FurnaceError(f"kernels.{op}: TRITON_INTERPRET=1 was set after `kernels` was imported, "
                                   "so its kernels were built for the GPU; set it before the first import")
    if impl == "liger":
        liger_module()
    return impl


@functools.lru_cache(maxsize=None)
def liger_module():
    """liger_kernel's functional API, or a FurnaceError saying how to get it."""
    try:
        from liger_kernel.transformers import functional  # noqa: PLC0415
    except ImportError as e:
        raise FurnaceError(f"impl='liger' needs liger-kernel ({type(e).__name__}: {e}); "
                           "install it with `pip install liger-kernel` or use impl='triton'/'torch'") from e
    log_once("kernels: liger-kernel (comparison)")
    return functional


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (M, D) with unit stride along D (a copy only when needed). # (M, D)"""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@triton.jit
def to_out(x, dtype: tl.constexpr):
    """Cast an fp32 tile to the output dtype with round-to-nearest-even. GPUs round this way already;
    Triton's interpreter truncates fp32 -> bf16, so bf16 is rounded by hand (exact on both)."""
    if dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16              # RNE at bit 16
        x = tl.where(x != x, x, b.to(tl.float32, bitcast=True))       # keep NaN a NaN
    return x.to(dtype)
