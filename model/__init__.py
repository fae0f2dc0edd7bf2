"""Furnace model core: config + presets, the GPT, FLOP counting, save/load.

Names are imported lazily (PEP 562): importing `model` costs nothing until a name is used.
"""
import importlib

_EXPORTS = {
    "GPTConfig": "model.config", "PRESETS": "model.config", "get_preset": "model.config",
    "FurnaceError": "kernels.common",
    "flops_per_token": "model.flops", "mfu": "model.flops", "peak_tflops": "model.flops",
    "GPT": "model.gpt", "KVCache": "model.gpt",
    "save": "model.io", "load": "model.io", "latest_checkpoint": "model.io",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
