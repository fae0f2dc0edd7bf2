"""Furnace inference: KV-cache generation, sampling, int8/bf16 precision, chat sessions, HF export, lm-eval.

    from infer import generate, quantize
    new_ids = generate(model, prompt_ids, max_new_tokens=64, temperature=0.7, top_p=0.9)
"""
from infer import int8_op
from infer.generation import generate
from infer.quant import Int8Linear, quantize
from infer.sampling import SamplingParams, check_sampling, filter_logits, next_token
from infer.session import ChatSession, CompletionSession, StreamDecoder

__all__ = ["generate", "quantize", "int8_op", "Int8Linear", "SamplingParams", "check_sampling", "filter_logits", "next_token",
           "ChatSession", "CompletionSession", "StreamDecoder"]
