"""Furnace kernels: public API. Each op has impl="torch" (reference), "triton", "liger", "auto" (see kernels/README.md)."""
from kernels.cross_entropy import cross_entropy
from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from kernels.rms_norm import rms_norm
from kernels.rope import apply_rope
from kernels.swiglu import swiglu

__all__ = ["rms_norm", "apply_rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy"]
