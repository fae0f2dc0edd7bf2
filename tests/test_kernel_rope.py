"""RoPE: the Triton kernel (forward and backward) against the PyTorch reference."""
import pytest
import torch

from kernels import apply_rope
from kernels.launch import GPUS, INTERPRETER
from kernels.rope import apply_rope_ref, rope_config, rope_launch
from kernels.testing import check, devices, fwd_bwd

DEVICES = devices()


def _tables(T, d2, base=10000.0):
    inv = 1.0 / base ** (torch.arange(d2, dtype=torch.float32) / d2)
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)          # (T, D/2)
    return ang.cos(), ang.sin()


def _run(x32, dy32, dtype, device, view=lambda t: t, cs_grad=False):
    T, D = view(x32).shape[1], view(x32).shape[3]
    cos, sin = (t.to(device) for t in _tables(T, D // 2))
    x, dy = x32.to(device=device, dtype=dtype), dy32.to(device=device, dtype=dtype)
    grads = [0, 1, 2] if cs_grad else [0]

    def tri(x, c, s):
        return apply_rope(view(x), c, s, impl="triton")

    def ref(x, c, s):
        return apply_rope_ref(view(x), c, s)

    out, g = fwd_bwd(tri, [x, cos, sin], dy, grads)
    r32, g32 = fwd_bwd(ref, [x.float(), cos, sin], dy.float(), grads)
    rlp, glp = fwd_bwd(ref, [x, cos, sin], dy, grads)
    assert out.dtype == dtype and g[0].dtype == dtype
    check("y", out, r32, rlp)
    for name, a, b, c in zip(["dx", "dcos", "dsin"], g, g32, glp):
        check(name, a, b, c, atol=1e-4 if name != "dx" else 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 17, 3, 64), (1, 5, 6, 10), (3, 9, 1, 126)])
def test_rope_matches_reference(shape, dtype, device):
    torch.manual_seed(0)
    _run(torch.randn(shape), torch.randn(shape), dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_non_contiguous_and_table_grads(device):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 11, 32)                            # seen as a (2, 11, 3, 32) transposed view
    _run(x, torch.randn(2, 11, 3, 32), torch.float32, device, view=lambda t: t.transpose(1, 2))
    _run(torch.randn(2, 7, 4, 20), torch.randn(2, 7, 4, 20), torch.float32, device, cs_grad=True)
    _run(torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16), torch.bfloat16, device, cs_grad=True)


def test_rope_rejects_wrong_table_shape():
    if "cpu" not in DEVICES:
        pytest.skip("needs the interpreter")
    cos, sin = _tables(8, 4)
    with pytest.raises(ValueError, match=r"cos/sin of shape \(9, 4\)"):
        apply_rope(torch.randn(1, 9, 2, 8), cos, sin, impl="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 17, 12, 64), (1, 40, 3, 64), (3, 5, 8, 96)])
def test_rope_cuda_launch_config_in_interpreter(shape, dtype):
    """The tiles a GPU's launcher chooses (kernels.launch.GPUS) for 112m/104m head shapes, forward, backward and
    the cos/sin gradients, run in the interpreter."""
    if "cpu" not in DEVICES:
        pytest.skip("needs the interpreter")
    gpu = GPUS["sm_89"]
    B, T, H, D = shape
    assert rope_config(B * T, H, D // 2, gpu) != rope_config(B * T, H, D // 2, INTERPRETER)
    torch.manual_seed(4)
    cos, sin = _tables(T, D // 2)
    x, dy = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    y, _, _ = rope_launch(x, cos, sin, target=gpu)
    dx, dcos, dsin = rope_launch(dy, cos, sin, backward=True, x_saved=x, target=gpu)
    r32, g32 = fwd_bwd(apply_rope_ref, [x.float(), cos, sin], dy.float(), [0, 1, 2])
    rlp, glp = fwd_bwd(apply_rope_ref, [x, cos, sin], dy, [0, 1, 2])
    check("y", y, r32, rlp)
    for name, a, b, c in zip(["dx", "dcos", "dsin"], [dx, dcos, dsin], g32, glp):
        check(name, a, b, c, atol=1e-4 if name != "dx" else 1e-5)
