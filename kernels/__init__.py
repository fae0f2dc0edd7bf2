"""Furnace kernels: public API. Each op has impl="torch" (reference), "triton", "liger", "auto" (see kernels/README.md).

The ops are imported on first use (PEP 562), so `from kernels.common import run_cli` (every entry script)
imports neither torch nor Triton.
"""
import importlib
import sys
import types

_EXPORTS = {"rms_norm": "kernels.rms_norm", "apply_rope": "kernels.rope", "swiglu": "kernels.swiglu",
            "cross_entropy": "kernels.cross_entropy",
            "fused_linear_cross_entropy": "kernels.fused_linear_cross_entropy"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing the submodule kernels.rms_norm sets the package attribute `rms_norm` to that module; the
        # name stays the op (the function of the same name), as an eager `from ... import` would leave it.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
