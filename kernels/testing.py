"""How the kernel tests judge a result (used by tests/test_kernel_*.py and bench/kernel_bench.py).

The rule (flash-attention's): run the reference twice, in fp32 on the same (rounded) inputs and in
the low precision itself. In fp32 the kernel must agree with the reference to ~1e-5. In bf16/fp16 the
kernel's largest error against the fp32 reference may be at most 2x the largest error of plain
PyTorch in that precision, plus a small atol: the tolerance is measured, not guessed.
"""
from __future__ import annotations

import os

import torch

FP32_RTOL, FP32_ATOL = 1e-5, 1e-5


def devices() -> list:
    """pytest params: "cpu" when Triton's interpreter is on (conftest sets it without CUDA), and "cuda",
    skipped when no GPU is present. The CPU run and the CUDA run execute the same test bodies."""
    import pytest  # noqa: PLC0415  (only the tests call this)

    out = []
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        out.append("cpu")
    out.append(pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                             reason="no CUDA device (the CPU run covers it)")))
    return out


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check(name: str, out: torch.Tensor, ref32: torch.Tensor, ref_lp: torch.Tensor | None = None,
          atol: float = 1e-5, rtol: float = FP32_RTOL) -> None:
    """out: the kernel's result; ref32: the reference in fp32; ref_lp: the reference run in out's
    precision (needed when out is bf16/fp16). Raises AssertionError with both errors on failure."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    assert torch.isfinite(out.float()).all(), f"{name}: non-finite values"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref32.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        return
    assert ref_lp is not None, f"{name}: a {out.dtype} result needs the low-precision reference run"
    err, base = max_err(out, ref32), max_err(ref_lp, ref32)
    assert err <= 2 * base + atol, (f"{name}: kernel error {err:.3e} vs fp32 > 2 x PyTorch {out.dtype} error "
                                    f"{base:.3e} + atol {atol:.1e}")


def fwd_bwd(fn, inputs: list[torch.Tensor], dy: torch.Tensor | None, grad_of: list[int]):
    """Run out = fn(*inputs) and backward(dy) on fresh leaves; returns (out, [grad of inputs[i] for i in grad_of])."""
    leaves = [t.detach().clone().requires_grad_(i in grad_of) if t.is_floating_point() else t
              for i, t in enumerate(inputs)]
    out = fn(*leaves)
    if dy is None:
        out.backward()
    else:
        out.backward(dy)
    return out.detach(), [leaves[i].grad for i in grad_of]
