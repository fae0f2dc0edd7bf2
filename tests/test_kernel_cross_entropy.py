"""Cross-entropy (ignore_index, z-loss, mean over valid rows): the Triton kernel against the reference."""
import pytest
import torch

from kernels import cross_entropy
from kernels.cross_entropy import cross_entropy_config, cross_entropy_fwd, cross_entropy_ref
from kernels.launch import GPUS, INTERPRETER
from kernels.testing import check, devices, fwd_bwd

DEVICES = devices()


def _targets(n, v, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, v, (n,), generator=g)
    t[list(ignored)] = -100
    return t


def _run(x32, t, dtype, device, z_loss=0.0, view=lambda x: x):
    """Loss and d loss / d logits of the kernel vs the reference in fp32 and in `dtype`.
    The upstream gradient is 1.7 in fp32; in bf16 a power of two (0.5), because the gradient is stored
    in bf16 during the forward and scaling it later by a non-power-of-two adds one rounding
    (documented in kernels/README.md)."""
    x, t = x32.to(device=device, dtype=dtype), t.to(device)
    dl = torch.tensor(1.7 if dtype == torch.float32 else 0.5, device=device)

    def tri(x):
        return cross_entropy(view(x), t, -100, z_loss, impl="triton")

    def ref(x):
        return cross_entropy_ref(view(x), t, -100, z_loss)

    loss, (g,) = fwd_bwd(tri, [x], dl, [0])
    r32, (g32,) = fwd_bwd(ref, [x.float()], dl, [0])
    rlp, (glp,) = fwd_bwd(ref, [x], dl, [0])
    assert loss.dtype == torch.float32 and loss.shape == () and g.dtype == dtype
    check("loss", loss, r32, rlp)
    scale = g32.abs().max().item()                          # gradients are ~1/(n*V): relative atol
    check("dlogits", g, g32, glp, atol=1e-5 * scale + 1e-12)
    return loss, g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [6400, 32000, 50257, 49152])
def test_cross_entropy_vocab_sizes(vocab, dtype, device):
    torch.manual_seed(vocab)
    x = torch.randn(3, vocab) * 4
    _run(x, _targets(3, vocab, ignored=[1], seed=vocab), dtype, device, z_loss=1e-4 if vocab % 2 else 0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_cross_entropy_odd_shapes_ignored_rows_z_loss(z_loss, dtype, device):
    torch.manual_seed(1)
    x = torch.randn(37, 1000) * 3 + 2                        # a shifted lse makes z-loss matter
    _run(x, _targets(37, 1000, ignored=[0, 5, 6, 36]), dtype, device, z_loss=z_loss)
    _run(torch.randn(5, 127), _targets(5, 127), dtype, device, z_loss=z_loss)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_all_ignored_is_zero_not_nan(device):
    x = torch.randn(4, 300)
    t = torch.full((4,), -100)
    loss, g = _run(x, t, torch.float32, device)
    assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))
    loss, g = _run(x, t, torch.bfloat16, device, z_loss=1e-3)
    assert loss.item() == 0.0 and not g.isnan().any() and not g.any()


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_non_contiguous(device):
    torch.manual_seed(2)
    wide = torch.randn(9, 700)                               # rows of a wider buffer: row stride 700
    _run(wide, _targets(9, 650, ignored=[3]), torch.float32, device, view=lambda x: x[:, 25:675])
    tall = torch.randn(300, 11)                              # a transposed (11, 300) view
    _run(tall, _targets(11, 300), torch.bfloat16, device, z_loss=1e-3, view=lambda x: x.t())


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_forward_only_and_single_backward(device):
    torch.manual_seed(3)
    x, t = torch.randn(6, 500, device=device), _targets(6, 500).to(device)
    with torch.no_grad():
        a = cross_entropy(x, t, impl="triton")
    torch.testing.assert_close(a, cross_entropy_ref(x, t), rtol=1e-5, atol=1e-6)
    xr = x.clone().requires_grad_()
    loss = cross_entropy(xr, t, impl="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,rows", [(49152, 3), (50257, 2), (1000, 37)])
def test_cross_entropy_cuda_launch_config_in_interpreter(vocab, rows, dtype):
    """The tiles a GPU's launcher chooses (kernels.launch.GPUS): 4,096-logit tiles looping over a large vocabulary,
    several rows per program for a small one; run in the interpreter."""
    if "cpu" not in DEVICES:
        pytest.skip("needs the interpreter")
    gpu = GPUS["sm_120"]
    assert cross_entropy_config(rows, vocab, gpu) != cross_entropy_config(rows, vocab, INTERPRETER)
    torch.manual_seed(5)
    x = (torch.randn(rows, vocab) * 4).to(dtype)
    t = _targets(rows, vocab, ignored=[1], seed=vocab)
    n_valid = (t != -100).sum()
    loss_rows, g = cross_entropy_fwd(x, t, -100, 1e-4, n_valid, write_grad=True, target=gpu)
    loss = loss_rows.sum() / n_valid

    def ref(x):
        return cross_entropy_ref(x, t, -100, 1e-4)

    r32, (g32,) = fwd_bwd(ref, [x.float()], None, [0])
    rlp, (glp,) = fwd_bwd(ref, [x], None, [0])
    check("loss", loss, r32, rlp)
    check("dlogits", g, g32, glp, atol=1e-5 * g32.abs().max().item() + 1e-12)
