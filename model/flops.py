"""The one FLOP formula and MFU, with the peak table it divides by.

Training FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B):
    flops_per_token(T) = 6 * N + 12 * L * d * T
where N counts the parameters of every matmul, the LM head included (the embedding lookup is not a
matmul; a tied LM head counts once, as the head), L = n_layer, d = n_head * head_dim, T = sequence
length. 6N is forward (2N) + backward (4N) of the dense layers; 12*L*d*T is attention's QK^T and AV.
"""
from __future__ import annotations

from model.config import GPTConfig

# Dense (no sparsity) peak TFLOP/s: (bf16, fp8). Sources in bench/README.md.
PEAK_TFLOPS: dict[str, tuple[float, float | None]] = {
    "RTX 4090": (165.2, 330.3),
    "RTX 5090": (209.5, 419.0),   # fp8 estimated (half the FP16-accumulate figure)
    "H100 SXM": (989.0, 1979.0),
    "H100 PCIe": (756.0, 1513.0),
    "H200": (989.0, 1979.0),
    "A100": (312.0, None),
}


# Peak memory bandwidth in GB/s (kernel benchmarks report % of it). Sources in bench/README.md.
PEAK_GBPS: dict[str, float] = {"RTX 4090": 1008.0, "RTX 5090": 1792.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0,
                               "H200": 4800.0, "A100": 2039.0}


def matmul_params(cfg: GPTConfig) -> int:
    d, kv = cfg.n_embd, cfg.n_kv_head * cfg.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * cfg.ffn_hidden   # q, o; k, v; gate, up, down
    return cfg.n_layer * per_layer + cfg.vocab_size * d           # + LM head


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """6N + 12 * L * d * T; see the module docstring."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def device_peak_name(device_name: str) -> str | None:
    """Map a CUDA device name (torch.cuda.get_device_name) to a row of PEAK_TFLOPS, or None."""
    n = device_name.upper()
    if "H200" in n:
        return "H200"
    if "H100" in n:
        return "H100 PCIe" if "PCIE" in n else "H100 SXM"
    if "A100" in n:
        return "A100"
    if "5090" in n:
        return "RTX 5090"
    if "4090" in n:
        return "RTX 4090"
    return None


def peak_tflops(device_name: str, precision: str = "bf16") -> float | None:
    """Dense peak for 'bf16' or 'fp8' on a known device; None when unknown."""
    row = device_peak_name(device_name)
    if row is None:
        return None
    bf16, fp8 = PEAK_TFLOPS[row]
    return fp8 if precision == "fp8" else bf16


def mfu(flops_per_tok: float, tokens_per_s: float, peak_tflops_: float | None,
        limit: float = 1.0) -> float | None:
    """Model FLOPs utilisation, or None when the peak is unknown.

    `tokens_per_s` is per device. No device beats its dense peak, so a value above `limit` (1: `peak_tflops_`
    is the peak of the precision that ran) is a bug, a step timed without synchronisation, tokens of several
    devices over one device's peak, or a wrong peak, and raises ValueError instead of being reported. An FP8
    run expressed against the BF16 peak passes limit = fp8_peak / bf16_peak."""
    if not peak_tflops_ or tokens_per_s <= 0:
        return None
    u = flops_per_tok * tokens_per_s / (peak_tflops_ * 1e12)
    if u > limit:
        raise ValueError(f"MFU {100 * u:.1f}% exceeds the possible {100 * limit:.0f}% ({tokens_per_s:.4g} tok/s x "
                         f"{flops_per_tok:.4g} FLOP/token vs {peak_tflops_} TFLOP/s): the step time is wrong "
                         "(missing device synchronisation?), tokens are counted over several devices, or the "
                         "peak is wrong")
    return u
