"""model/flops.py against numbers worked out by hand, and against nanoGPT's estimate for GPT-2 124M."""
import math

import pytest
import torch

from model.config import get_preset
from model.flops import PEAK_TFLOPS, device_peak_name, flops_per_token, matmul_params, mfu, peak_tflops
from model.gpt import GPT


def test_124m_flops_per_token_by_hand():
    cfg = get_preset("124m")
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.ffn_hidden) == \
        (50304, 12, 768, 12, 12, 2048)
    # per layer: q, k, v, o = 4 * 768 * 768 = 2,359,296; gate, up, down = 3 * 768 * 2048 = 4,718,592
    # -> 7,077,888 per layer, x 12 = 84,934,656; LM head 50304 * 768 = 38,633,472; N = 123,568,128
    assert matmul_params(cfg) == 123_568_128
    # 6N = 741,408,768; attention 12 * L * d * T = 12 * 12 * 768 * 1024 = 113,246,208
    assert flops_per_token(cfg, 1024) == 854_654_976
    # the attention term grows linearly with T: T = 2048 adds another 113,246,208
    assert flops_per_token(cfg, 2048) - flops_per_token(cfg, 1024) == 113_246_208


def test_matmul_params_match_the_real_model():
    """N = every parameter of the built model except the RMSNorm weights (2 per layer + the final norm);
    the tied LM head counts once."""
    for name in ("124m", "112m", "tiny"):
        cfg = get_preset(name)
        with torch.device("meta"):
            model = GPT(cfg)
        norms = (2 * cfg.n_layer + 1) * cfg.n_embd
        assert matmul_params(cfg) == model.num_params() - norms, name


def _nanogpt_gpt2_params(vocab: int, n_layer: int = 12, d: int = 768, ctx: int = 1024) -> tuple[int, int]:
    """GPT-2 small as nanoGPT builds it: (all parameters, nanoGPT's get_num_params() = without wpe)."""
    per_layer = (d * 3 * d + 3 * d      # c_attn weight + bias
                 + d * d + d            # attn c_proj
                 + d * 4 * d + 4 * d    # mlp c_fc
                 + 4 * d * d + d        # mlp c_proj
                 + 2 * 2 * d)           # ln_1, ln_2 (weight + bias)
    total = vocab * d + ctx * d + n_layer * per_layer + 2 * d   # wte (tied head), wpe, blocks, ln_f
    return total, total - ctx * d


def test_cross_check_with_nanogpt_estimate_for_gpt2_124m():
    # The architecture count reproduces the published GPT-2 small size (124,439,808 with the 50257 vocab).
    assert _nanogpt_gpt2_params(50257)[0] == 124_439_808
    # nanoGPT pads the vocab to 50304 and estimates 6N + 12*L*H*Q*T with N = get_num_params().
    _, n_nano = _nanogpt_gpt2_params(50304)
    assert n_nano == 123_689_472                                       # nanoGPT prints "123.69M"
    L, H, Q, T = 12, 12, 64, 1024
    nano = 6 * n_nano + 12 * L * H * Q * T
    assert nano == 855_383_040
    ours = flops_per_token(get_preset("124m"), T)
    # Same matmul shapes (SwiGLU 3 x 768 x 2048 == GELU MLP 2 x 768 x 3072); nanoGPT also counts biases and
    # LayerNorm parameters: 12 * (2304 + 768 + 3072 + 768 + 4 * 768) + 2 * 768 = 121,344 of them.
    assert nano - ours == 6 * 121_344
    assert abs(ours / nano - 1) < 1e-3


def test_mfu_by_hand():
    # 854,654,976 FLOP/token x 400,000 tok/s = 341.86 TFLOP/s; / 989 (H100 SXM) = 0.345664
    assert mfu(854_654_976, 400_000, 989.0) == pytest.approx(0.3456643, rel=1e-6)
    # nanoGPT's anchor: 37% of an A100's 312 TFLOP/s at 855,383,040 FLOP/token is ~134,958 tok/s
    assert mfu(855_383_040, 134_958, 312.0) == pytest.approx(0.37, abs=1e-5)


def test_mfu_never_exceeds_100_percent():
    assert mfu(1e9, 989e3, 989.0) == pytest.approx(1.0)              # exactly at peak: allowed
    with pytest.raises(ValueError, match="exceeds the possible 100%"):
        mfu(1e9, 1.0e6, 989.0)                                         # 1.011 of peak: a timing bug
    with pytest.raises(ValueError):
        mfu(854_654_976, 8 * 400_000, 312.0)                           # e.g. 8 GPUs' tokens over one A100
    # An FP8 run against the BF16 peak may pass 1, never the FP8 peak: limit = fp8 / bf16.
    assert mfu(1e9, 1.5e6, 989.0, limit=1979.0 / 989.0) == pytest.approx(1.5e15 / 989e12)
    with pytest.raises(ValueError):
        mfu(1e9, 2.0e6, 989.0, limit=1979.0 / 989.0)


def test_mfu_unknown_peak_or_no_tokens_is_none():
    assert mfu(1e9, 1e5, None) is None
    assert mfu(1e9, 0.0, 989.0) is None


@pytest.mark.parametrize("name,row", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA GeForce RTX 5090", "RTX 5090"),
    ("Tesla T4", None),
    ("NVIDIA L4", None),
])
def test_device_name_to_peak_row(name, row):
    assert device_peak_name(name) == row


def test_peak_values_from_field_notes():
    # Dense figures from FIELD_NOTES.md / bench/README.md (bf16, fp8).
    expected = {"RTX 4090": (165.2, 330.3), "RTX 5090": (209.5, 419.0), "H100 SXM": (989.0, 1979.0),
                "H100 PCIe": (756.0, 1513.0), "H200": (989.0, 1979.0), "A100": (312.0, None)}
    assert PEAK_TFLOPS == expected
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp8") == 1979.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert peak_tflops("Tesla T4") is None
    # Dense FP8 is twice dense BF16 on every listed FP8 part (a sparse figure would show up as 4x).
    for row, (bf16, fp8) in PEAK_TFLOPS.items():
        if fp8 is not None:
            assert math.isclose(fp8 / bf16, 2.0, rel_tol=0.01), row
