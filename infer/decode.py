"""The decoder: next-token logits for a model, eager or through a compiled one-token step (CPU).

    decoder = Decoder(model)
    decoder.compile()                      # optional; False (and eager decoding) when compiling fails
    generate(model, prompt, 64, decoder=decoder)
The compiled step lives in the Decoder, not on the model: the model stays a plain module.

Why: decoding one token is a chain of ~60 small ops per layer (RMSNorm, RoPE, SwiGLU, cache writes, casts,
views). Eager PyTorch spends 5-10 us on each, about 4 ms per token on 112m: as much as the int8 matmuls
themselves (bench/generate.py, infer/README.md). torch.compile (inductor, C++ wrapper) fuses them into a few
C++ loops and calls them and the int8 linears (infer/int8_op.py) from C++, with no Python per op.

- One graph per model, dynamic in the cache position (prefill stays eager: it is compute bound).
- First compile 30-45 s on 2 cores (112m); inductor caches it on disk, so later processes take 5-15 s.
- Compile after quantize(): the graph is built for the model as it is then.
- When compiling fails (no C++ compiler, an unsupported op, ...) the model decodes in eager mode, with one
  log line saying why. CPU only: on CUDA the step stays eager.
"""
from __future__ import annotations

import logging
import time
import types

import torch

from model.gpt import GPT, KVCache

log = logging.getLogger("furnace")


def eager_last_logits(model: GPT, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Logits (V,) fp32 of the last position only (the LM head runs on one row, not T)."""
    h = model.hidden_states(x, cache)                                     # (1, T, d)
    return model.lm_head(h[:, -1]).float()[0]                            # (V,)


def _step(model: GPT, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
    cache.pos = pos  # an int argument: compiled once with a symbolic position, not once per position
    return eager_last_logits(model, x, cache)


AUTO_MIN_MATMUL_PARAMS = 20_000_000


def wants_compile(choice: str, model: GPT) -> bool:
    """--compile on | off | auto. auto: models of >= 20M matmul parameters, whose eager decode is bounded by
    per-op overhead at ~100-250 tok/s on 2 cores; smaller ones decode fast enough not to wait for a compile."""
    if choice == "auto":
        return model.matmul_params() >= AUTO_MIN_MATMUL_PARAMS
    return choice == "on"


class Decoder:
    """Logits (V,) fp32 of the last position of `x` for `model`; one-token steps with a cache take the
    compiled step once compile() has succeeded, every other call (prefill, no cache) runs eagerly."""

    def __init__(self, model: GPT):
        self.model = model
        self.step = None             # the compiled step, once compile() succeeded: called with a flat argument list
        self._signature = None       # the warm-up cache's layout: what the step was built for
        self._sources = None         # the step's inputs, as dynamo names them ("L['model']._modules[...]", ...)
        self._bound = None           # (cache, argument list) of the last cache the step ran on

    def compile(self) -> bool:
        """Compile the one-token decode step now, on a scratch cache, so failures show here. Returns True
        when the compiled step is in use."""
        model = self.model
        device = model.embed.weight.device
        if device.type != "cpu":
            log.info(f"decode: eager (the compiled decode step is for CPU; model on {device})")
            return False
        log.info("decode: compiling the one-token step (first time up to ~45 s on 2 cores; cached on disk after)")
        t0 = time.perf_counter()
        graphs = []

        def backend(gm, example_inputs):
            """inductor (C++ wrapper), keeping the compiled graph and where dynamo took each of its inputs from."""
            from torch._inductor import config
            from torch._inductor.compile_fx import compile_fx
            with config.patch(cpp_wrapper=True):
                fn = compile_fx(gm, example_inputs)
            # Per input: where dynamo read it, and the dtype of a tensor it passes (a float such as norm_eps comes
            # in as a 0-d float64 tensor).
            places = [n.meta["grapharg"].source.name for n in gm.graph.nodes if n.op == "placeholder"]
            graphs.append((fn, [(src, getattr(e, "dtype", None)) for src, e in zip(places, example_inputs)]))
            return fn

        # Dynamo keeps compiled graphs per code object: give each decoder a copy of _step's code, so models in one
        # process (bench/generate.py compiles six) never check each other's guards or share a recompile limit.
        fn = types.FunctionType(_step.__code__.replace(), _step.__globals__, "decode_step")
        step = torch.compile(fn, dynamic=True, backend=backend)
        try:
            with torch.inference_mode():
                # Position 2: position 0 (Tq == Tk, a different attention branch) never reaches the step, since a
                # prompt always fills the cache first, and 0 / 1 are values dynamo specialises.
                cache = model.new_cache(1)
                x = torch.zeros(1, 1, dtype=torch.long, device=device)
                step(model, x, cache, 2)
                if len(graphs) != 1 or [src for src, _ in graphs[0][1][:2]] != ["L['pos']", "L['x']"]:
                    raise RuntimeError(f"the step became {len(graphs)} graphs, or not one with inputs (pos, x, ...)")
                self.step, self._sources = graphs[0]
                self._signature = _cache_signature(cache)
                # Position 3, called directly and through dynamo (the same graph: one cache entry), must agree.
                cache.pos = 3
                direct = self.last_logits(x, cache)
                if cache.pos != 4 or not torch.equal(direct, step(model, x, cache, 3)) or len(graphs) != 1:
                    raise RuntimeError("calling the compiled graph directly does not give what dynamo's call gives")
        except Exception as e:  # noqa: BLE001 - any compile failure falls back to eager
            first = (str(e).strip().splitlines() or [""])[0][:160]
            log.warning(f"decode: eager (compiling the decode step failed: {type(e).__name__}: {first})")
            self.step = self._bound = None
            return False
        log.info(f"decode: compiled in {time.perf_counter() - t0:.1f} s")
        return True

    def last_logits(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        if self.step is not None and cache is not None and x.shape == (1, 1) and self._fits(x, cache):
            # The compiled graph is called directly, not through dynamo's frame: that would fetch each of its ~70-150
            # weights from the module tree and evaluate guards on every token (~0.4 ms of a 1.3 ms 26m token).
            # The argument list is built once per cache (weights, cache tensors, their sizes); each call sets
            # the token and the position. _fits checks what dynamo's guards would for this one graph.
            if self._bound is None or self._bound[0] is not cache:
                scope = {"L": {"model": self.model, "cache": cache, "x": x, "pos": cache.pos}}
                values = [(eval(src, scope), dtype) for src, dtype in self._sources]   # noqa: S307 - dynamo's names
                self._bound = cache, [torch.tensor(v, dtype=dtype) if dtype is not None and not torch.is_tensor(v)
                                      else v for v, dtype in values]
            args = self._bound[1]
            args[0], args[1] = cache.pos, x
            logits, cache.pos = self.step(*args)               # the graph returns the cache's next position too
            return logits
        return eager_last_logits(self.model, x, cache)

    def _fits(self, x: torch.Tensor, cache: KVCache) -> bool:
        """The inputs the compiled step was built for: a one-token int64 id on the model's device, a cache like
        the warm-up's (new_cache(1)), a position from 2 to the last free one, and inference mode (as in generate)."""
        return (torch.is_inference_mode_enabled() and x.dtype == torch.long and x.device == cache.k[0].device
                and 2 <= cache.pos < cache.max_len and _cache_signature(cache) == self._signature)


def _cache_signature(cache: KVCache) -> tuple:
    k = cache.k[0]
    return len(cache.k), len(cache.v), tuple(k.shape), k.stride(), k.dtype, k.device, k.is_inference()
