"""Furnace inference: KV-cache generation, sampling, int8/bf16 precision, chat sessions, HF export, lm-eval.

    from infer import generate, quantize
    new_ids = generate(model, prompt_ids, max_new_tokens=64, temperature=0.7, top_p=0.9)
Names are imported lazily (PEP 562), so the commands' `--help` does not import torch.
"""
import importlib

_EXPORTS = {"generate": "infer.generation", "quantize": "infer.quant", "Int8Linear": "infer.quant",
            "SamplingParams": "infer.sampling", "check_sampling": "infer.sampling", "filter_logits": "infer.sampling",
            "next_token": "infer.sampling", "ChatSession": "infer.session", "CompletionSession": "infer.session",
            "StreamDecoder": "infer.session"}
__all__ = [*_EXPORTS, "int8_op"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "int8_op":
        return importlib.import_module("infer.int8_op")
    raise AttributeError(f"module 'infer' has no attribute {name!r}")
