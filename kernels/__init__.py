"""Furnace kernels: public API. Each op has impl="torch" (reference), "triton", "liger", "auto" (see kernels/README.md).

Names are imported lazily (PEP 562), so `from kernels.common import run_cli` (every entry script) does not
import torch or Triton.
"""
import importlib

_EXPORTS = {"rms_norm": "kernels.rms_norm", "apply_rope": "kernels.rope", "swiglu": "kernels.swiglu",
            "cross_entropy": "kernels.cross_entropy",
            "fused_linear_cross_entropy": "kernels.fused_linear_cross_entropy"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups are plain module attributes
        return value
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
