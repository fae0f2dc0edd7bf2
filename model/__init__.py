"""Furnace model core: config + presets, the GPT, FLOP counting, save/load."""
from model.config import PRESETS, GPTConfig, get_preset
from model.errors import FurnaceError
from model.flops import flops_per_token, mfu, peak_tflops
from model.gpt import GPT, KVCache
from model.io import latest_checkpoint, load, save

__all__ = ["GPTConfig", "PRESETS", "get_preset", "GPT", "KVCache", "save", "load", "latest_checkpoint",
           "flops_per_token", "mfu", "peak_tflops", "FurnaceError"]
