"""RMSNorm: the Triton kernel (forward and backward) against the PyTorch reference."""
import pytest
import torch

from kernels import rms_norm
from kernels.launch import GPUS, INTERPRETER
from kernels.rms_norm import rms_norm_bwd, rms_norm_fwd, rms_norm_fwd_config, rms_norm_ref
from kernels.testing import check, devices, fwd_bwd

DEVICES = devices()


def _run(x32, w32, dy32, dtype, device, view=lambda t: t, eps=1e-6):
    """Kernel in `dtype` vs the reference in fp32 (same rounded inputs) and in `dtype`."""
    x, w, dy = (t.to(device=device, dtype=dtype) for t in (x32, w32, dy32))

    def tri(x, w):
        return rms_norm(view(x), w, eps, impl="triton")

    def ref(x, w):
        return rms_norm_ref(view(x), w, eps)

    out, (dx, dw) = fwd_bwd(tri, [x, w], dy, [0, 1])
    r32, (rdx32, rdw32) = fwd_bwd(ref, [x.float(), w.float()], dy.float(), [0, 1])
    rlp, (rdx, rdw) = fwd_bwd(ref, [x, w], dy, [0, 1])
    assert out.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    check("y", out, r32, rlp)
    check("dx", dx, rdx32, rdx)
    check("dw", dw, rdw32, rdw, atol=1e-4)   # a sum over rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 1000), (37, 127), (1, 64), (130, 48)])
def test_rms_norm_matches_reference(shape, dtype, device):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    w = 1 + 0.5 * torch.randn(shape[-1])
    dy = torch.randn(shape)
    _run(x, w, dy, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_non_contiguous(device):
    torch.manual_seed(1)
    x = torch.randn(20, 2 * 127)                           # the kernel sees a strided (20, 127) view
    w = torch.randn(127)
    dy = torch.randn(20, 127)
    _run(x, w, dy, torch.float32, device, view=lambda t: t[:, ::2])
    xt = torch.randn(96, 9)                                # and a transposed (9, 96) one
    _run(xt, torch.randn(96), torch.randn(9, 96), torch.bfloat16, device, view=lambda t: t.t())


def test_rms_norm_fp16_and_dw_reduced_in_fp32():
    """Many rows with a large common component: summing dw in bf16 would lose it; fp32 keeps it."""
    if "cpu" not in [d for d in DEVICES if isinstance(d, str)]:
        pytest.skip("needs the interpreter")
    torch.manual_seed(2)
    x = torch.randn(2000, 64) + 4.0
    _run(x, torch.ones(64), torch.ones(2000, 64), torch.bfloat16, "cpu")
    _run(x[:300], torch.ones(64), torch.randn(300, 64), torch.float16, "cpu")


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 768), (5, 64), (300, 1000)])
def test_rms_norm_cuda_launch_config_in_interpreter(shape, dtype, target):
    """The tiles and persistent grid a GPU's launcher chooses (kernels.launch.GPUS), run in the interpreter."""
    if "cpu" not in DEVICES:
        pytest.skip("needs the interpreter")
    gpu = GPUS[target]
    M, N = shape
    assert rms_norm_fwd_config(M, N, gpu) != rms_norm_fwd_config(M, N, INTERPRETER)   # really other tiles
    torch.manual_seed(3)
    x32, w32, dy32 = torch.randn(shape) * 3, 1 + 0.5 * torch.randn(N), torch.randn(shape)
    x, w, dy = (t.to(dtype) for t in (x32, w32, dy32))
    y, rstd, x2 = rms_norm_fwd(x, w, 1e-6, target=gpu)
    dx, dw = rms_norm_bwd(dy, x2, w, rstd, target=gpu)
    r32, (rdx32, rdw32) = fwd_bwd(rms_norm_ref, [x.float(), w.float()], dy.float(), [0, 1])
    rlp, (rdx, rdw) = fwd_bwd(rms_norm_ref, [x, w], dy, [0, 1])
    check("y", y, r32, rlp)
    check("dx", dx, rdx32, rdx)
    check("dw", dw, rdw32, rdw, atol=1e-4)
