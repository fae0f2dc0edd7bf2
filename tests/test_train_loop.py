"""The Trainer: token-normalised gradient accumulation, non-finite steps, lr schedules."""
import math

import pytest
import torch

from model import GPT, FurnaceError, GPTConfig
from train.optim import build_optimizer, lr_at
from train.options import TrainOptions
from train.task import LMTask
from train.trainer import Trainer

CFG = dict(vocab_size=61, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=48, max_seq_len=32,
           kernels="torch")


class ListLoader:
    """Yields fixed batches in order; enough of the loader interface for the Trainer."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, d):
        self.i = d["i"]


def make_trainer(tmp_path, batches, grad_accum, task_cls=LMTask, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opts = TrainOptions(max_steps=kw.pop("max_steps", 1), grad_accum=grad_accum, lr=0.5, min_lr=0.5,
                        schedule="constant", grad_clip=0.0, **kw)
    return Trainer(opts, task_cls(ListLoader(batches)), model, run_dir=tmp_path, optimizer=opt)


def data_with_uneven_targets():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 61, (8, 12), generator=g)
    y = torch.randint(0, 61, (8, 12), generator=g)
    for r in range(8):  # row r keeps r + 1 targets: micro-batches carry very different token counts
        y[r, r + 1:] = -100
    return x, y


def test_grad_accum_8x1_equals_1x8_and_token_weighted_reference(tmp_path):
    x, y = data_with_uneven_targets()
    big = make_trainer(tmp_path / "a", [(x, y)], grad_accum=1)
    small = make_trainer(tmp_path / "b", [(x[i:i + 1], y[i:i + 1]) for i in range(8)], grad_accum=8)
    # independent reference: one SGD step on the mean over all 36 valid tokens
    torch.manual_seed(0)
    ref = GPT(GPTConfig(**CFG))
    logits, _ = ref(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), y.reshape(-1), ignore_index=-100)
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.5 * p.grad
    out_big, out_small = big.train_step(), small.train_step()
    assert out_big["n_tokens"] == out_small["n_tokens"] == 36
    assert math.isclose(out_big["loss"], loss.item(), rel_tol=1e-5)
    assert math.isclose(out_small["loss"], loss.item(), rel_tol=1e-5)
    for p_ref, p_big, p_small in zip(ref.parameters(), big.model.parameters(), small.model.parameters()):
        torch.testing.assert_close(p_big, p_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p_small, p_ref, rtol=1e-5, atol=1e-6)


def test_non_finite_steps_are_skipped_then_abort(tmp_path):
    x, y = data_with_uneven_targets()
    bad_steps = {1, 3, 4, 5}
    calls = {"n": 0}

    class FlakyTask(LMTask):
        def loss(self, model, batch):
            loss, extra = super().loss(model, batch)
            step = calls["n"]
            calls["n"] += 1
            return (loss * float("nan") if step in bad_steps else loss), extra

    tr = make_trainer(tmp_path, [(x, y)], grad_accum=1, task_cls=FlakyTask, max_steps=10, max_bad_steps=3)
    tr.train_step()                                   # step 0: fine
    before = [p.detach().clone() for p in tr.model.parameters()]
    out = tr.train_step()                             # step 1: NaN -> skipped, weights untouched
    assert out["skipped"] and tr.state.bad_in_row == 1
    assert all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    assert all(p.grad is None for p in tr.model.parameters())
    assert not tr.train_step()["skipped"]             # step 2: fine again, counter resets
    assert tr.state.bad_in_row == 0 and tr.state.bad_total == 1
    with pytest.raises(FurnaceError, match="3 non-finite steps in a row"):
        tr.fit()                                      # steps 3, 4, 5 are NaN -> abort
    assert tr.state.bad_total == 4
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum('"skipped": true' in ln for ln in lines) == 3   # the fit() part logged its 3 skips


def test_lr_schedules():
    kw = dict(max_steps=100, lr=1.0, min_lr=0.1, warmup=10)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)        # warmup (step+1)/warmup
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(55, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: midpoint
    assert lr_at(100, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(79, schedule="wsd", wsd_decay=0.2, **kw) == pytest.approx(1.0)  # stable until 80
    assert lr_at(90, schedule="wsd", wsd_decay=0.2, **kw) == pytest.approx(0.55)  # linear decay
    assert lr_at(60, schedule="constant", **kw) == 1.0


def test_no_weight_decay_on_norms_and_embeddings():
    model = GPT(GPTConfig(**CFG))
    opt = build_optimizer(model, 1e-3, 0.1, "cpu")
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.embed.weight) not in decay and id(model.norm.weight) not in decay
    assert id(model.layers[0].attn.q_proj.weight) in decay
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len(list(model.parameters()))          # every parameter exactly once (tied head too)


def test_activation_checkpointing_gives_the_same_step_and_plain_names(tmp_path):
    """--activation-checkpointing wraps the blocks from outside the model (the Trainer): same update as
    without, and the state_dict (hence every checkpoint and the EMA) keeps the model's own names."""
    x, y = data_with_uneven_targets()
    plain = make_trainer(tmp_path / "a", [(x, y)], grad_accum=1)
    ckpt = make_trainer(tmp_path / "b", [(x, y)], grad_accum=1, activation_checkpointing=True, ema=0.9)
    assert plain.train_step()["loss"] == ckpt.train_step()["loss"]
    for p_a, p_b in zip(plain.model.parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(p_a, p_b, rtol=0, atol=0)
    names = set(ckpt.model.state_dict())
    assert names == set(GPT(GPTConfig(**CFG)).state_dict()) and set(ckpt.ema) <= names
    assert "CheckpointWrapper" in repr(ckpt.model.layers[0])
