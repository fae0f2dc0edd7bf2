"""SwiGLU: the Triton kernel (forward and backward) against the PyTorch reference."""
import pytest
import torch

from kernels import swiglu
from kernels.launch import GPUS, INTERPRETER
from kernels.swiglu import swiglu_bwd, swiglu_config, swiglu_fwd, swiglu_ref
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_cuda_launch_config_in_interpreter(dtype):
    """The 1,024-element tiles a GPU's launcher chooses (kernels.launch.GPUS), run in the interpreter."""
    if "cpu" not in DEVICES:
        pytest.skip("needs the interpreter")
    gpu = GPUS["sm_90"]
    n = 3 * 2048 + 5                                        # several tiles and a partial one
    assert swiglu_config(n, gpu) != swiglu_config(n, INTERPRETER)
    torch.manual_seed(2)
    g, u, dy = (t.to(dtype) for t in (torch.randn(n) * 3, torch.randn(n), torch.randn(n)))
    y = swiglu_fwd(g, u, target=gpu)
    dg, du = swiglu_bwd(dy, g, u, target=gpu)
    r32, (rdg32, rdu32) = fwd_bwd(swiglu_ref, [g.float(), u.float()], dy.float(), [0, 1])
    rlp, (rdg, rdu) = fwd_bwd(swiglu_ref, [g, u], dy, [0, 1])
    check("y", y, r32, rlp)
    check("dgate", dg, rdg32, rdg)
    check("dup", du, rdu32, rdu)
