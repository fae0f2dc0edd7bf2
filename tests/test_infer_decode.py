"""The C++ operators (our int8 matmul on each instruction set; FBGEMM's linear, C++ and Python; the one-query decode
attention) and the compiled CPU decode step (infer.decode)."""
import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from infer import generate, int8_op, quantize
from infer.decode import Decoder, eager_last_logits, wants_compile
from infer.quant import Int8Linear, huge_page_weights, pack_rows, quantize_rows
from test_infer import random_model  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]


ISAS = int8_op.native_isas()
ATTENTION_ISAS = int8_op.attention_isas()


def int8_matmul_ref(x, q, s):
    """The spec of our int8 matmul in PyTorch: each row of x to int8 with its own symmetric scale (round half to
    even), exact integer dot products (int64), then the same fp32 epilogue float(acc) * (s_x * s_w)."""
    amax = x.abs().amax(dim=1, keepdim=True)                            # (M, 1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(x * inv).clamp(-127, 127).long()                   # (M, K)
    acc = (xq[:, None, :] * q.long()[None, :, :]).sum(-1)               # (M, N) exact
    return acc.float() * ((amax / 127.0) * s[None, :])


def test_this_machine_runs_the_kernels_its_cpu_has():
    # The reference is the kernel's own list of CPU flags (/proc/cpuinfo), not our detection: on the dev and CI
    # machines (AVX-512 VNNI) every path is exercised; an older CPU must list exactly what it runs.
    flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split())
    vnni = {"avx512f", "avx512bw", "avx512_vnni"} <= flags
    avx2 = {"avx2", "fma"} <= flags
    assert int8_op.backend() == "cpp"
    assert ISAS == ("avx512_vnni",) * vnni + ("avx2",) * avx2
    assert ATTENTION_ISAS == ("avx512",) * ("avx512f" in flags) + ("avx2",) * avx2 + ("portable",)
    assert int8_op.attention_isa() == ATTENTION_ISAS[0]


def test_pack_rows_layout():
    q = torch.randint(-127, 128, (70, 10), dtype=torch.int8)
    s = torch.rand(70)
    buf = pack_rows(q, s)
    assert buf.shape == (128 * 12 + 128 * 8,)                           # N 70 -> 128 rows, K 10 -> 12
    packed = buf[:128 * 12].view(2, 3, 64, 4)
    ps, rs = buf[128 * 12:128 * 16].view(torch.float32), buf[128 * 16:].view(torch.int32)
    for b, kq, r, j in [(0, 0, 0, 0), (0, 2, 5, 1), (1, 1, 5, 3), (1, 2, 63, 3)]:
        n, k = 64 * b + r, 4 * kq + j
        assert packed[b, kq, r, j] == (q[n, k] if n < 70 and k < 10 else 0)
    assert torch.equal(ps[:70], s) and not ps[70:].any()
    assert torch.equal(rs[:70], q.sum(1, dtype=torch.int32)) and not rs[70:].any()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (1, 129, 770), (5, 37, 53), (6, 200, 130), (9, 64, 4), (2, 1, 3)])
def test_our_int8_matmul_matches_the_integer_reference(isa, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g) * 3
    x[0, : K // 2] = 0                                                  # a ragged row
    if M > 2:
        x[2] = 0                                                        # an all-zero row: scale 0, output 0
    lin = Int8Linear(w, backend=isa)
    y = lin(x)
    q, s = quantize_rows(w)
    ref = int8_matmul_ref(x, q, s)
    # Integer accumulation is exact and the epilogue is the same fp32 expression: equal up to the last bit.
    torch.testing.assert_close(y, ref, rtol=2e-7, atol=0)
    if M > 2:
        assert not y[2].any()
    assert (y - x @ w.T).abs().max() > 1e-3                             # really int8, not the float weights
    assert torch.equal(lin(x[1:2]), y[1:2])                             # each row alone = in a batch


def _int8_child(code: str, tmp_path, w, x, **env) -> tuple[subprocess.CompletedProcess, torch.Tensor | None]:
    """Run `code` in a fresh process with `env` set (the process-wide int8 choices are made once per process):
    argv = repo root, a file holding {"w", "x"}, the file to save its output to -> (the run, its output or None)."""
    torch.save({"w": w, "x": x}, tmp_path / "wx.pt")
    out = tmp_path / "y.pt"
    out.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "wx.pt"), str(out)],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    return r, (torch.load(out) if out.is_file() else None)


def test_int8_kernel_switch(tmp_path):
    """FURNACE_INT8_KERNEL forces a path (the fallback included) for every Int8Linear of the process."""
    torch.manual_seed(3)
    w, x = torch.randn(96, 80), torch.randn(2, 80)
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from infer.quant import Int8Linear; "
            "d = torch.load(sys.argv[2]); lin = Int8Linear(d['w']); print(lin.backend); "
            "torch.save(lin(d['x']), sys.argv[3])")
    for kernel in (*ISAS, "fbgemm"):
        r, y = _int8_child(code, tmp_path, w, x, FURNACE_INT8_KERNEL=kernel)
        assert r.returncode == 0 and r.stdout.split() == [kernel], r.stderr
        assert torch.equal(y, Int8Linear(w, backend=kernel)(x))
    r, _ = _int8_child(code, tmp_path, w, x, FURNACE_INT8_KERNEL="avx9")
    assert r.returncode != 0 and "FURNACE_INT8_KERNEL=avx9: expected one of auto, avx512_vnni, avx2, fbgemm" in r.stderr


def test_int8_operator_matches_fbgemm_and_dequantized_reference():
    torch.manual_seed(0)
    w = torch.randn(37, 53)                                             # odd shapes
    lin = Int8Linear(w, backend="fbgemm")
    assert int8_op.backend() == "cpp"                                    # this machine has a compiler
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
    lin = Int8Linear(torch.randn(8, 16), backend="fbgemm")
    key = lin._key
    int8_op.release(key)
    with pytest.raises(RuntimeError, match="released"):
        int8_op.linear_op()(torch.randn(1, 16), key, 8)
    lin._key = None                                                      # already released
    other = Int8Linear(torch.randn(8, 16), backend="fbgemm")
    assert other._key == key                                             # the freed slot is taken again
    for copy_fn in (copy.copy, copy.deepcopy):                           # a copy would share the slot
        with pytest.raises(TypeError, match="cannot be copied"):
            copy_fn(other)


def test_python_operator_fallback_gives_the_same_numbers(tmp_path):
    torch.manual_seed(1)
    w, x = torch.randn(24, 40), torch.randn(3, 40)
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from infer import int8_op; "
            "from infer.quant import Int8Linear; d = torch.load(sys.argv[2]); "
            "lin = Int8Linear(d['w']); assert int8_op.backend() == 'python' and lin.backend == 'fbgemm'; "
            "torch.save(lin(d['x']), sys.argv[3])")
    r, y = _int8_child(code, tmp_path, w, x, FURNACE_NO_CPP_OPS="1")
    assert r.returncode == 0, r.stderr
    assert torch.equal(y, Int8Linear(w, backend="fbgemm")(x))


@pytest.mark.parametrize("isa", ATTENTION_ISAS)
def test_decode_attention_matches_sdpa(isa):
    """Each instruction set's kernel against SDPA in fp64 (the reference) on odd shapes, reading keys and values in
    place from a cache's views. Measured over this grid (outputs of magnitude ~1-4), max |error| vs fp64: ours
    2.4e-6 to 3.7e-6 by instruction set, SDPA in fp32 7.9e-6. Bounds: over the grid at most 2x SDPA fp32's error
    (flash-attention's rule), and 1e-5 in every case."""
    g = torch.Generator().manual_seed(0)
    errs, errs_sdpa = [], []
    for hd in (16, 64, 80, 20):                                          # 20: lanes past the last whole vector
        for group in (1, 2, 4):
            for B in (1, 3):
                Hkv = 3
                ck, cv = torch.randn(2, B, 320, Hkv, hd, generator=g) * 2    # (B, Tmax, Hkv, hd) caches
                q = torch.randn(B, group * Hkv, hd, generator=g) * 2         # (B, H, hd)
                for L in (1, 2, 15, 16, 17, 100, 300):
                    k, v = ck[:, :L], cv[:, :L]                              # (B, L, Hkv, hd) views
                    y = int8_op.decode_attention(q, k, v, isa)
                    qg = q.view(B, Hkv, group, hd)                           # (B, Hkv, g, hd)
                    ref = F.scaled_dot_product_attention(qg.double(), k.double().transpose(1, 2),
                                                         v.double().transpose(1, 2)).reshape(B, -1, hd)
                    sdpa = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2)).reshape(B, -1, hd)
                    errs.append((y.double() - ref).abs().max().item())
                    errs_sdpa.append((sdpa.double() - ref).abs().max().item())
                    assert y.shape == (B, group * Hkv, hd) and errs[-1] < 1e-5, (hd, group, B, L, errs[-1])
    assert max(errs) <= 2 * max(errs_sdpa), (max(errs), max(errs_sdpa))
    assert torch.equal(y[1:2], int8_op.decode_attention(q[1:2], k[1:2], v[1:2], isa))   # a row alone = in a batch


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_decode_attention_keeps_greedy_decode(mode):
    """Decode steps through our attention kernel (eager and in the compiled step) give the tokens of the same model
    decoding through SDPA, over 40 tokens; the kernel runs in every layer of every one-query step."""
    model = quantize(random_model(sharp=True, n_layer=3, n_embd=128, n_head=8, n_kv_head=2, max_seq_len=64), mode)
    assert ATTENTION_ISAS and all(b.attn.attention_isa == ATTENTION_ISAS[0] for b in model.layers)   # g = 4, hd = 16
    sdpa_model = copy.deepcopy(model)
    for b in sdpa_model.layers:
        b.attn.attention_isa = None
    prompt = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = generate(sdpa_model, prompt, 40)
    assert generate(model, prompt, 40) == expected
    dec = Decoder(model)
    assert dec.compile()
    with torch.profiler.profile() as prof:
        assert generate(model, prompt, 40, decoder=dec) == expected
    assert [e.name for e in prof.events()].count("furnace_int8::decode_attention") == 39 * 3
    with torch.inference_mode():                                          # logits of both at every decode position
        ca, cb = model.new_cache(1), sdpa_model.new_cache(1)
        eager_last_logits(model, torch.tensor([prompt]), ca)
        eager_last_logits(sdpa_model, torch.tensor([prompt]), cb)
        err = max((dec.last_logits(torch.tensor([[t]]), ca) - eager_last_logits(sdpa_model, torch.tensor([[t]]), cb))
                  .abs().max().item() for t in expected[:-1])
    assert err < 1e-4, err   # measured 1.9e-6 (fp32), 3.8e-6 (int8) on logits of magnitude ~10


def test_decode_attention_without_cpp_ops_takes_sdpa(tmp_path):
    """Without the C++ operators (FURNACE_NO_CPP_OPS=1, as without a compiler) decode attention stays SDPA's and
    gives the same tokens."""
    model = quantize(random_model(sharp=True, n_layer=2), "fp32")
    prompt = [5, 6, 7, 8]
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + '/tests'); "
            "from test_infer import random_model; from infer import generate, int8_op, quantize; "
            "m = quantize(random_model(sharp=True, n_layer=2), 'fp32'); "
            "assert int8_op.attention_isa() is None and all(b.attn.attention_isa is None for b in m.layers); "
            "print(json.dumps(generate(m, [5, 6, 7, 8], 32)))")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], env={**os.environ, "FURNACE_NO_CPP_OPS": "1"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[-2] == str(generate(model, prompt, 32)).replace("'", "")


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
            # The compiled graph, called directly (not through dynamo), moves the cache position as eager does.
            got = [dec.last_logits(torch.tensor([[t]]), cache) for t in eager_ids[:-1]]
    assert cache.pos == len(prompt) + len(eager_ids) - 1
    # generate() calls the compiled graph without dynamo's guards (infer.decode._fits checks the inputs instead): a
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


def _mapping_of(ptr: int) -> dict:
    """The /proc/self/smaps entry (sizes in kB) of the mapping holding address `ptr`."""
    entry = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):  # a mapping's first line: its range
            if entry is not None:
                return entry
            lo, hi = (int(v, 16) for v in head.split("-"))
            entry = {"range": (lo, hi)} if lo <= ptr < hi else None
        elif entry is not None and line.split()[-1] == "kB":
            entry[head.rstrip(":")] = int(line.split()[1])
    return entry


def test_int8_weights_in_one_huge_page_mapping(monkeypatch):
    # Same bytes: logits equal to a model whose packed weights stay where pack_rows put them.
    model = random_model(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, vocab_size=1000)
    plain = copy.deepcopy(model)
    if not ISAS:  # FBGEMM's weights live in its own packed objects: nothing to move
        assert huge_page_weights(quantize(model, "int8")) == 0
        return
    monkeypatch.setenv("FURNACE_NO_HUGE_PAGES", "1")
    quantize(plain, "int8")
    monkeypatch.delenv("FURNACE_NO_HUGE_PAGES")
    quantize(model, "int8")
    x = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x)[0], plain(x)[0])
    packed = [m.packed for m in model.modules() if isinstance(m, Int8Linear)]
    maps = [_mapping_of(p.data_ptr()) for p in packed]
    assert len({m["range"] for m in maps}) == 1 and all(p.data_ptr() % 64 == 0 for p in packed)
    assert _mapping_of(plain.lm_head.packed.data_ptr())["range"] != maps[0]["range"]
    # What the kernel did with the advice: 2 MB pages unless transparent huge pages are off here.
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    assert (maps[0]["AnonHugePages"] > 0) == (mode != "never"), (mode, maps[0])


def test_int8_weights_stay_put_where_the_kernel_refuses_huge_pages(monkeypatch, caplog):
    # A kernel built without transparent huge pages answers madvise(MADV_HUGEPAGE) with EINVAL: quantize still works.
    import errno
    import mmap

    import infer.quant as quant

    class NoTHP(mmap.mmap):
        def madvise(self, *args):
            raise OSError(errno.EINVAL, "Invalid argument")

    model = random_model(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, vocab_size=1000)
    plain = quantize(copy.deepcopy(model), "int8")
    monkeypatch.setattr(quant.mmap, "mmap", NoTHP)
    with caplog.at_level(logging.INFO, logger="furnace"):
        quantize(model, "int8")
        assert huge_page_weights(model) == 0
    x = torch.randint(0, 1000, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(x)[0], plain(x)[0])
    if ISAS:
        assert "stay in 4 KB pages (madvise MADV_HUGEPAGE: Invalid argument)" in caplog.text
