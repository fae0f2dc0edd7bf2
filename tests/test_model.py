"""The GPT core against independent references: causality, GQA, RoPE, parameter counts, KV cache,
save/load, and a tiny model overfitting one batch."""
import math

import pytest
import torch

from model import GPT, PRESETS, FurnaceError, GPTConfig, get_preset, load, save
from model.rope import rope_tables

SMALL = dict(vocab_size=97, n_layer=2, n_embd=48, n_head=6, n_kv_head=2, ffn_hidden=80, max_seq_len=64,
             kernels="torch")


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, **kw})).eval()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_causality(qk_norm):
    m = small_model(qk_norm=qk_norm)
    idx = torch.randint(0, 97, (2, 20))
    t = 11
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % 97
    with torch.no_grad():
        a, _ = m(idx)
        b, _ = m(idx2)
    assert torch.equal(a[:, :t], b[:, :t])           # nothing before t moves
    assert not torch.allclose(a[:, t], b[:, t])      # position t does


def test_gqa_equals_multihead_with_repeated_kv():
    gqa = small_model(n_kv_head=2)
    mha = small_model(n_kv_head=6)
    sd = gqa.state_dict()
    rep = 6 // 2
    hd = 48 // 6
    for k, v in list(sd.items()):
        if k.endswith("k_proj.weight") or k.endswith("v_proj.weight"):
            # (Hkv*hd, d) -> (Hkv, hd, d) -> repeat each kv head for its query group -> (H*hd, d)
            sd[k] = v.view(2, hd, 48).repeat_interleave(rep, dim=0).reshape(6 * hd, 48)
    mha.load_state_dict(sd)
    idx = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], rtol=1e-5, atol=1e-5)


def _rotate(x, pos, cos, sin):
    """Independent reference: rotate pairs (x_i, x_{i+D/2}) by angle pos*freq_i as complex numbers."""
    d2 = x.shape[-1] // 2
    z = torch.complex(x[:d2].double(), x[d2:].double())
    ang = torch.complex(cos[pos].double(), sin[pos].double())
    r = z * ang
    return torch.cat([r.real, r.imag])


@pytest.mark.parametrize("scaling", ["none", "linear", "ntk", "yarn"])
def test_rope_relative_position(scaling):
    import kernels
    cfg = GPTConfig(**{**SMALL, "rope_scaling": scaling, "rope_factor": 4.0, "rope_original_max_seq_len": 16})
    cos, sin = rope_tables(cfg, 64)
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)
    # apply_rope matches the complex-rotation reference
    x = torch.randn(1, 64, 1, 8)
    out = kernels.apply_rope(x, cos[:, :4], sin[:, :4], impl="torch")
    for p in (0, 5, 63):
        torch.testing.assert_close(out[0, p, 0].double(), _rotate(x[0, p, 0], p, cos[:, :4], sin[:, :4]))
    # q.k after rotation depends only on the offset m - n (up to the YaRN attention scale)
    hd = cfg.head_dim
    q, k = torch.randn(hd), torch.randn(hd)
    dots = [(_rotate(q, m, cos, sin) @ _rotate(k, m - 3, cos, sin)).item() for m in (3, 10, 40, 63)]
    assert max(dots) - min(dots) < 1e-5 * max(1.0, abs(dots[0]))  # fp32 tables


def _hand_count(c: GPTConfig) -> int:
    d, kv = c.n_embd, c.n_kv_head * (c.n_embd // c.n_head)
    attn = d * d + d * kv + d * kv + d * d
    mlp = 3 * d * c.ffn_hidden
    layer = attn + mlp + 2 * d
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return c.vocab_size * d + c.n_layer * layer + d + head


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_counts(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        m = GPT(cfg)
    assert m.num_params() == _hand_count(cfg)


def test_named_preset_sizes():
    def n(name):
        with torch.device("meta"):
            return GPT(get_preset(name)).num_params()
    assert round(n("112m") / 1e6, 1) == 112.1          # Elite-112M
    assert 25e6 < n("26m") < 27e6 and 103e6 < n("104m") < 105e6
    assert 0.9e9 < n("1b") < 1.1e9


@pytest.mark.parametrize("n_kv_head", [2, 6])
def test_kv_cache_equals_full_recompute(n_kv_head):
    m = small_model(n_kv_head=n_kv_head)
    idx = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        full, _ = m(idx)
        cache = m.new_cache(batch_size=2, max_len=40)
        parts = [m(idx[:, :9], cache=cache)[0]]            # prefill
        parts.append(m(idx[:, 9:14], cache=cache)[0])       # chunked prefill on top of the cache
        for t in range(14, 23):                             # one token at a time
            parts.append(m(idx[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 23


def test_save_load_bit_exact(tmp_path):
    m = small_model(qk_norm=True)
    save(m, tmp_path / "ck")
    m2 = load(tmp_path / "ck")
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert m2.lm_head.weight is m2.embed.weight
    idx = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(m(idx)[0], m2(idx)[0])


def test_save_strips_compile_prefix(tmp_path):
    m = small_model()
    wrapper = torch.nn.Module()
    wrapper._orig_mod = m                              # what torch.compile's wrapper looks like
    wrapper.config = m.config
    save(wrapper, tmp_path / "ck")
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "ck" / "model.safetensors")).keys()
    assert all(not k.startswith(("_orig_mod.", "module.")) for k in keys)
    assert "embed.weight" in keys and "lm_head.weight" not in keys


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FurnaceError, match="no such file"):
        load(tmp_path / "nope")
    m = small_model()
    save(m, tmp_path / "ck")
    w = tmp_path / "ck" / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(FurnaceError, match="model.safetensors"):
        load(tmp_path / "ck")
    save(m, tmp_path / "ck2")
    cfg = m.config.to_dict() | {"n_embd": 96}
    import json
    (tmp_path / "ck2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FurnaceError, match="shape"):
        load(tmp_path / "ck2")


def test_load_run_dir_picks_newest(tmp_path):
    a, b = small_model(0), small_model(1)
    save(a, tmp_path / "run" / "checkpoints" / "step_00000010")
    save(b, tmp_path / "run" / "checkpoints" / "step_00000020")
    (tmp_path / "run" / "checkpoints" / ".tmp-step_00000030").mkdir()
    m = load(tmp_path / "run")
    assert torch.equal(m.embed.weight, b.embed.weight)


def test_config_errors():
    with pytest.raises(FurnaceError, match="n_kv_head"):
        GPTConfig(**{**SMALL, "n_kv_head": 4})
    with pytest.raises(FurnaceError, match="unknown preset"):
        get_preset("7b")


def test_init_std():
    torch.manual_seed(0)
    m = GPT(get_preset("tiny"))
    assert abs(m.layers[0].attn.q_proj.weight.std().item() - 0.02) < 1e-3
    resid = 0.02 / math.sqrt(2 * m.config.n_layer)
    assert abs(m.layers[0].mlp.down_proj.weight.std().item() - resid) < 1e-3


def test_tiny_overfits_one_batch():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**{**SMALL, "n_layer": 2})).train()
    idx = torch.randint(0, 97, (4, 32))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > math.log(97) - 0.5
    assert loss.item() < 0.1


def test_document_masking_equals_separate_sequences():
    m = small_model()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 12))
    packed = torch.cat([a, b], dim=1)                                  # (1, 19)
    doc_ids = torch.tensor([[0] * 7 + [1] * 12])
    with torch.no_grad():
        out, _ = m(packed, doc_ids=doc_ids)
        ref_a, _ = m(a)
        ref_b, _ = m(b)
    torch.testing.assert_close(out[:, :7], ref_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 7:], ref_b, rtol=1e-5, atol=1e-5)   # same logits as if alone


def test_kernels_is_a_runtime_choice_not_saved(tmp_path):
    """config.json never records `kernels`; one written by an older version that did still loads (as auto)."""
    import json
    from model import load, save
    save(GPT(GPTConfig(**{**SMALL, "kernels": "triton"})), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "kernels" not in raw and load(tmp_path).config.kernels == "auto"
    (tmp_path / "config.json").write_text(json.dumps({**raw, "kernels": "triton"}))
    assert load(tmp_path).config.kernels == "auto"
