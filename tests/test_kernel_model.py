"""The model through the one kernel switch: impl="triton" gives the same logits, loss and gradients as
impl="torch", and a short training run tracks it."""
import pytest
import torch

from kernels.testing import devices
from model import GPT, FurnaceError, GPTConfig

DEVICES = devices()
CFG = dict(vocab_size=300, n_layer=2, n_embd=48, n_head=6, n_kv_head=2, ffn_hidden=80, max_seq_len=32,
           qk_norm=True)


def _pair(device, seed=0, **kw):
    torch.manual_seed(seed)
    a = GPT(GPTConfig(**{**CFG, **kw}, kernels="torch")).to(device)
    b = GPT(GPTConfig(**{**CFG, **kw}, kernels="torch")).to(device)
    b.load_state_dict(a.state_dict())
    b.set_kernels("triton")
    return a, b


@pytest.mark.parametrize("device", DEVICES)
def test_model_logits_loss_and_grads_agree(device):
    a, b = _pair(device)
    idx = torch.randint(0, 300, (2, 13), device=device)
    tgt = torch.randint(0, 300, (2, 13), device=device)
    tgt[0, :4] = -100
    for m in (a, b):
        _, loss = m(idx, tgt, z_loss=1e-4)
        loss.backward()
    with torch.no_grad():
        la, lossa = a(idx, tgt, z_loss=1e-4, return_logits=True)
        lb, lossb = b(idx, tgt, z_loss=1e-4, return_logits=True)
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lossb, lossa, rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_triton_training_tracks_torch(device):
    """20 AdamW steps on one batch: the two loss curves stay together and both go down. One layer keeps
    the interpreter's per-launch cost down; it still runs every kernel (qk-norm, RoPE, SwiGLU, linear+CE)."""
    a, b = _pair(device, seed=1, n_layer=1)
    idx = torch.randint(0, 300, (4, 24), device=device)
    curves = []
    for m in (a, b):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        losses = []
        for _ in range(20):
            _, loss = m(idx[:, :-1], idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    ta, tb = torch.tensor(curves[0]), torch.tensor(curves[1])
    assert (ta - tb).abs().max() < 2e-3 * ta.max(), (curves[0], curves[1])
    assert tb[-1] < tb[0] - 1.0


def test_impl_errors_are_clear(monkeypatch):
    import kernels
    with pytest.raises(FurnaceError, match="impl='cuda', expected one of"):
        kernels.swiglu(torch.ones(2), torch.ones(2), impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(FurnaceError, match="TRITON_INTERPRET=1"):
        kernels.rms_norm(torch.ones(2, 4), torch.ones(4), impl="triton")
    # "auto" never picks the interpreter: CPU tensors take the PyTorch reference
    x = torch.randn(3, 5)
    assert torch.equal(kernels.rms_norm(x, torch.ones(5), impl="auto"), kernels.rms_norm(x, torch.ones(5), impl="torch"))


def test_liger_impl_matches_reference_or_says_how_to_get_it():
    """Without liger-kernel: a clear error. With it: our adapters give the reference's answers (RoPE and the
    losses run in Triton's interpreter; Liger's RMSNorm and SwiGLU kernels only on a GPU)."""
    import kernels
    from kernels._dispatch import liger_module
    from kernels.cross_entropy import cross_entropy_ref
    from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy_ref
    from kernels.rope import apply_rope_ref
    try:
        liger_module()
    except FurnaceError as e:
        assert "pip install liger-kernel" in str(e)
        with pytest.raises(FurnaceError, match="liger-kernel"):
            kernels.swiglu(torch.ones(2), torch.ones(2), impl="liger")
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    q = torch.randn(2, 5, 4, 16, device=dev)
    ang = torch.outer(torch.arange(5.0), torch.rand(8)).to(dev)
    torch.testing.assert_close(kernels.apply_rope(q, ang.cos(), ang.sin(), impl="liger"),
                               apply_rope_ref(q, ang.cos(), ang.sin()))
    t = torch.randint(0, 100, (6,), device=dev)
    t[2] = -100
    logits, h, w = (torch.randn(6, 100, device=dev), torch.randn(6, 16, device=dev), torch.randn(100, 16, device=dev))
    torch.testing.assert_close(kernels.cross_entropy(logits, t, -100, 1e-2, impl="liger"),
                               cross_entropy_ref(logits, t, -100, 1e-2))
    torch.testing.assert_close(kernels.fused_linear_cross_entropy(h, w, t, -100, 1e-2, impl="liger"),
                               fused_linear_cross_entropy_ref(h, w, t, -100, 1e-2))
    if dev == "cuda":
        x, g = torch.randn(8, 64, device=dev), torch.randn(8, 64, device=dev)
        torch.testing.assert_close(kernels.rms_norm(x, g[0], impl="liger"), kernels.rms_norm(x, g[0], impl="torch"))
        torch.testing.assert_close(kernels.swiglu(x, g, impl="liger"), kernels.swiglu(x, g, impl="torch"))
