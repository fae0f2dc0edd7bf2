"""The int8 operator (C++ and Python backends) and the compiled CPU decode step (infer.decode)."""
import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infer import generate, int8_op, quantize
from infer.decode import Decoder, eager_last_logits, wants_compile
from infer.quant import Int8Linear, quantize_rows
from test_infer import random_model  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]


def test_int8_operator_matches_fbgemm_and_dequantized_reference():
    torch.manual_seed(0)
    w = torch.randn(37, 53)                                             # odd shapes
    lin = Int8Linear(w)
    assert lin.backend == "fbgemm" and int8_op.backend() == "cpp"       # this machine has a compiler
    x = torch.randn(5, 53)
    y = lin(x)
    # Same kernel as calling FBGEMM on the packed object directly: bit-identical.
    assert torch.equal(y, torch.ops.quantized.linear_dynamic(x, lin._packed, False))
    # Independent reference: dequantized int8 weights times activations put through FBGEMM's documented
    # dynamic quantization (uint8, one scale and zero point per tensor, range including 0), in fp32.
    # Measured max |diff| 6e-6 (summation order); without the activation rounding it is 0.15.
    q, s = quantize_rows(w)
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    step = (hi - lo) / 255
    zp = round(-lo / step)
    xd = ((torch.round(x / step) + zp).clamp(0, 255) - zp) * step
    ref = xd @ (q.float() * s[:, None]).T
    assert (y - ref).abs().max() < 1e-4
    assert not torch.equal(y, x @ w.T)                                   # really int8, not the float weights


def test_released_slot_errors_and_is_reused():
    lin = Int8Linear(torch.randn(8, 16))
    key = lin._key
    int8_op.release(key)
    with pytest.raises(RuntimeError, match="released"):
        int8_op.linear_op()(torch.randn(1, 16), key, 8)
    lin._key = None                                                      # already released
    other = Int8Linear(torch.randn(8, 16))
    assert other._key == key                                             # the freed slot is taken again
    for copy_fn in (copy.copy, copy.deepcopy):                           # a copy would share the slot
        with pytest.raises(TypeError, match="cannot be copied"):
            copy_fn(other)


def test_python_operator_fallback_gives_the_same_numbers(tmp_path):
    torch.manual_seed(1)
    w, x = torch.randn(24, 40), torch.randn(3, 40)
    torch.save({"w": w, "x": x}, tmp_path / "wx.pt")
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from infer import int8_op; "
            "from infer.quant import Int8Linear; d = torch.load(sys.argv[2]); "
            "y = Int8Linear(d['w'])(d['x']); assert int8_op.backend() == 'python'; torch.save(y, sys.argv[3])")
    env = {**os.environ, "FURNACE_NO_CPP_OPS": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "wx.pt"), str(tmp_path / "y.pt")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert torch.equal(torch.load(tmp_path / "y.pt"), Int8Linear(w)(x))


@pytest.mark.parametrize("mode", ["int8", "fp32"])
def test_compiled_decode_matches_eager(mode):
    model = quantize(random_model(sharp=True, n_layer=3, max_seq_len=64), mode)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 97, (9,), generator=g).tolist()
    eager_ids = generate(model, prompt, 30)
    # Eager logits at every decode position, from one cache.
    with torch.inference_mode():
        cache = model.new_cache(1)
        eager_last_logits(model, torch.tensor([prompt]), cache)
        ref = [eager_last_logits(model, torch.tensor([[t]]), cache) for t in eager_ids[:-1]]
    dec = Decoder(model)
    assert dec.compile() and dec.step is not None
    # The compiled step gives the same greedy tokens, and for a second prompt of another length with a fresh
    # cache it must not compile again (one graph, symbolic position).
    with torch.compiler.set_stance("fail_on_recompile"):
        assert generate(model, prompt, 30, decoder=dec) == eager_ids
        generate(model, prompt[:4], 10, decoder=dec)
        with torch.inference_mode():
            cache = model.new_cache(1)
            eager_last_logits(model, torch.tensor([prompt]), cache)
            got = [dec.step(model, torch.tensor([[t]]), cache, cache.pos) for t in eager_ids[:-1]]
    assert cache.pos == len(prompt) + len(eager_ids) - 1
    # generate() skips dynamo's guards for the compiled step (infer.decode._fits checks the inputs instead): a
    # cache unlike the warm-up's (another length) must take the eager path and still give the same tokens.
    calls = []
    compiled = dec.step
    dec.step = lambda *a: calls.append(1) or compiled(*a)
    assert generate(model, prompt, 30, cache=model.new_cache(1, 48), decoder=dec) == eager_ids and not calls
    assert generate(model, prompt, 30, decoder=dec) == eager_ids and len(calls) == 29
    # A cache made outside inference mode (as chat sessions make theirs) takes the compiled step too.
    assert generate(model, prompt, 30, cache=model.new_cache(1), decoder=dec) == eager_ids and len(calls) == 58
    assert generate(model, prompt, 30) == eager_ids and len(calls) == 58   # no decoder: eager, model untouched
    # Fused C++ loops sum in another order than eager ops: measured max |diff| 1.9e-6 (int8 and fp32)
    # on logits of magnitude ~10; bound 1e-4.
    err = max((a - b).abs().max().item() for a, b in zip(got, ref))
    assert err < 1e-4, err


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    model = random_model(sharp=True)
    expected = generate(model, [1, 2, 3], 8)

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="furnace"):
        dec = Decoder(model)
        assert dec.compile() is False
    assert "decode: eager (compiling the decode step failed: RuntimeError: no C++ compiler found)" in caplog.text
    assert dec.step is None and generate(model, [1, 2, 3], 8, decoder=dec) == expected


def test_auto_compiles_only_models_of_20m_matmul_parameters_or_more():
    from model import GPT
    from model.config import get_preset
    small = random_model()
    with torch.device("meta"):
        big = GPT(get_preset("26m"))
    assert [wants_compile(c, small) for c in ("auto", "on", "off")] == [False, True, False]
    assert [wants_compile(c, big) for c in ("auto", "on", "off")] == [True, True, False]
