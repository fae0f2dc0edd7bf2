"""SwiGLU: the Triton kernel (forward and backward) against the PyTorch reference."""
import pytest
import torch

from kernels import swiglu
from kernels.swiglu import swiglu_ref
from kernels.testing import check, devices, fwd_bwd

DEVICES = devices()


def _run(g32, u32, dy32, dtype, device, view=lambda t: t):
    g, u, dy = (t.to(device=device, dtype=dtype) for t in (g32, u32, dy32))

    def tri(g, u):
        return swiglu(view(g), view(u), impl="triton")

    def ref(g, u):
        return swiglu_ref(view(g), view(u))

    out, (dg, du) = fwd_bwd(tri, [g, u], dy, [0, 1])
    r32, (rdg32, rdu32) = fwd_bwd(ref, [g.float(), u.float()], dy.float(), [0, 1])
    rlp, (rdg, rdu) = fwd_bwd(ref, [g, u], dy, [0, 1])
    assert out.dtype == dtype and dg.dtype == dtype and du.dtype == dtype
    check("y", out, r32, rlp)
    check("dgate", dg, rdg32, rdg)
    check("dup", du, rdu32, rdu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 1000), (13, 127), (70001,)])
def test_swiglu_matches_reference(shape, dtype, device):
    torch.manual_seed(0)
    _run(torch.randn(shape) * 3, torch.randn(shape), torch.randn(shape), dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_non_contiguous(device):
    torch.manual_seed(1)
    g, u = torch.randn(40, 33), torch.randn(40, 33)          # seen as (33, 40) transposed views
    _run(g, u, torch.randn(33, 40), torch.bfloat16, device, view=lambda t: t.t())
    _run(g, u, torch.randn(40, 17), torch.float32, device, view=lambda t: t[:, ::2])
