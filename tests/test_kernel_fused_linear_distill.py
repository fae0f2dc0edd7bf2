"""The chunked distillation loss: against the materialised reference (loss and gradients, odd sizes, ignored
rows, several chunk sizes) and the reference against a hand-written per-token formula."""
import math

import pytest
import torch

from kernels.fused_linear_distill import fused_linear_distill, fused_linear_distill_ref


def inputs(N=37, D=24, Dt=40, V=53, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3
    ht = torch.randn(N, Dt, generator=g, dtype=torch.float64)
    wt = torch.randn(V, Dt, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    y[::ignore_every] = -100
    return h, w, ht, wt, y


def test_reference_is_the_hand_formula():
    h, w, ht, wt, y = inputs(N=6, V=7)
    a, T = 0.3, 2.0
    total, n = 0.0, 0
    for i in range(6):
        if y[i] == -100:
            continue
        s, t = (h[i] @ w.T).tolist(), (ht[i] @ wt.T).tolist()
        ce = math.log(sum(math.exp(v) for v in s)) - s[y[i]]
        zs, zt = sum(math.exp(v / T) for v in s), sum(math.exp(v / T) for v in t)
        p = [math.exp(v / T) / zt for v in t]
        q = [math.exp(v / T) / zs for v in s]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        total += (1 - a) * ce + a * T * T * kl
        n += 1
    assert fused_linear_distill_ref(h, w, ht, wt, y, a, T).item() == pytest.approx(total / n, rel=1e-12)


@pytest.mark.parametrize("alpha, T", [(0.0, 1.0), (1.0, 1.0), (0.5, 2.0), (0.9, 4.0)])
@pytest.mark.parametrize("chunk", [None, 1, 8, 64])
def test_chunked_equals_materialised_loss_and_gradients(alpha, T, chunk):
    h, w, ht, wt, y = inputs()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = fused_linear_distill_ref(h1, w1, ht, wt, y, alpha, T)
    ref.backward()
    got = fused_linear_distill(h2, w2, ht, wt, y, alpha, T, chunk_size=chunk)
    (got * 1.0).backward()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-9, atol=1e-12)


def test_fp32_within_measured_tolerance_and_teacher_gets_no_gradient():
    h, w, ht, wt, y = (t.float() if t.is_floating_point() else t for t in inputs(N=70, V=200))
    ht.requires_grad_()
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    fused_linear_distill_ref(hr, wr, ht.detach().double(), wt.double(), y, 0.5, 2.0).backward()
    h.requires_grad_()
    w.requires_grad_()
    loss = fused_linear_distill(h, w, ht, wt, y, 0.5, 2.0, chunk_size=16)
    loss.backward()
    assert ht.grad is None
    torch.testing.assert_close(h.grad, hr.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, wr.grad.float(), rtol=1e-4, atol=1e-6)


def test_identical_models_give_zero_kl():
    h, w, _, _, y = inputs()
    kd = fused_linear_distill(h, w, h, w, y, alpha=1.0, temperature=3.0)
    assert abs(kd.item()) < 1e-12
