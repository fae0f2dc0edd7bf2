"""DPO: loss and rewards against hand-computed values, sequence log-probs against a per-token loop, the
reference cache, a tiny model learning its training pairs through the shared loop, and the CLI."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import train_bpe
from model import GPT, GPTConfig
from sft import IGNORE, PairLoader, build_sft_example, dpo_loss, reference_logps, sequence_logps
from sft.dpo import LN2, DPOTask, cached_reference_logps
from train.options import TrainOptions
from train.optim import build_optimizer
from train.precision import Precision
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_dpo_loss_and_rewards_match_hand_computation():
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -3.0])
    rc, rr = torch.tensor([-1.5, -3.5]), torch.tensor([-1.5, -3.5])
    beta = 0.1
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta)
    # pair 0: chosen 0.1*(−1+1.5)=0.05, rejected 0.1*(−2+1.5)=−0.05, margin 0.1
    # pair 1: chosen 0.1*(−4+3.5)=−0.05, rejected 0.1*(−3+3.5)=0.05, margin −0.1
    assert cr.tolist() == pytest.approx([0.05, -0.05]) and rj.tolist() == pytest.approx([-0.05, 0.05])
    want = (math.log(1 + math.exp(-0.1)) + math.log(1 + math.exp(0.1))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    same = torch.tensor([-7.0, -2.5, -10.0])
    loss0, c0, r0 = dpo_loss(same, same - 3, same, same - 3, 0.5)
    assert loss0.item() == pytest.approx(math.log(2), abs=1e-7) and (c0 == 0).all() and (r0 == 0).all()


@pytest.fixture(scope="module")
def tok():
    texts = ["def add(a, b):\n    return a + b\n", "Write a Python function that adds two numbers."] * 30
    return train_bpe(texts, vocab_size=300)


def tiny_model(vocab, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128, max_seq_len=128,
                    kernels="torch")
    return GPT(cfg)


def make_pairs(tok, n=8):
    """Half the prompts want `+`, half want `-`: the pairs conflict unless the model reads the prompt."""
    out = []
    for i in range(n):
        op, other, verb = ("+", "-", "Add") if i % 2 == 0 else ("-", "+", "Subtract")
        prompt = [{"role": "user", "content": f"{verb} {i}."}]
        good = prompt + [{"role": "assistant", "content": f"def f(a):\n    return a {op} {i}"}]
        bad = prompt + [{"role": "assistant", "content": f"def f(a):\n    return a {other} {i}"}]
        out.append((build_sft_example(tok, good, 128, last_only=True), build_sft_example(tok, bad, 128, last_only=True)))
    return out


def test_sequence_logps_equals_per_token_sum(tok):
    model = tiny_model(tok.vocab_size).eval()
    pairs = make_pairs(tok, 2)
    ld = PairLoader(pairs, None, batch_size=2, pad_id=tok.eos_id, max_len=128, shuffle=False)
    b = ld.next_batch()
    with torch.no_grad():
        got = sequence_logps(model, b["x"], b["y"])
        for row, (ids, labels) in enumerate([p[0] for p in pairs] + [p[1] for p in pairs]):
            logits, _ = model(torch.tensor([ids]))
            lp = torch.log_softmax(logits[0].double(), -1)
            want = sum(lp[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != IGNORE)
            assert got[row].item() == pytest.approx(want, abs=1e-4)


def test_reference_cache_is_keyed_by_checkpoint_and_data(tmp_path, tok):
    pairs = make_pairs(tok, 3)
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(len(pairs), 2)

    a = cached_reference_logps(tmp_path, "ck1", pairs, compute)
    b = cached_reference_logps(tmp_path, "ck1", pairs, compute)            # cached: not recomputed
    assert len(calls) == 1 and torch.equal(a, b)
    cached_reference_logps(tmp_path, "ck2", pairs, compute)                # other checkpoint
    cached_reference_logps(tmp_path, "ck1", pairs[:2], compute)            # other data
    assert len(calls) == 3 and len(list(tmp_path.glob("ref-*.safetensors"))) == 3


def test_dpo_drives_training_reward_accuracy_to_one(tmp_path, tok):
    """Tiny model, 8 pairs, the shared Trainer: loss ln 2 and no reward margin at step 0, reward accuracy 1.0
    within 30 steps."""
    model = tiny_model(tok.vocab_size)
    pairs = make_pairs(tok, 8)
    ref = reference_logps(model, pairs, 4, tok.eos_id, 128, "cpu")
    ld = PairLoader(pairs, ref, batch_size=4, pad_id=tok.eos_id, max_len=128, seed=1)
    beta = 0.1
    opts = TrainOptions(max_steps=30, lr=1e-3, min_lr=1e-3, schedule="constant", log_every=1000, eval_every=15)
    prec = Precision(torch.float32)
    # evaluation: the DPO task's probe of training pairs (all 8 here: fewer than its 64)
    task = DPOTask(ld, beta, [], None, 0.0, "cpu", prec.autocast)
    tr = Trainer(opts, task, model, run_dir=tmp_path, optimizer=build_optimizer(model, opts.lr, 0.0, "cpu"))
    summary = tr.fit()
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(LN2, abs=1e-5)                # policy == reference at step 0
    assert {"reward_acc", "reward_margin", "chosen_reward", "rejected_reward"} <= steps[0].keys()
    evals = [r for r in recs if "train_loss" in r]
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert evals[0]["train_loss"] == pytest.approx(LN2, abs=1e-6) and evals[0]["train_reward_acc"] == 0.0  # ties
    assert summary["train_reward_acc"] == 1.0 and summary["train_reward_margin"] > 0
    assert summary["train_loss"] < 0.5


# ---- CLI ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory, tok):
    from model.io import save
    d = tmp_path_factory.mktemp("sft_init")
    save(tiny_model(tok.vocab_size), d)
    tok.save(d)
    return d


def run_dpo(args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "sft" / "train_dpo.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


PAIR = {"prompt": "Add one.", "chosen": "def f(a):\n    return a + 1", "rejected": "no"}


@pytest.mark.parametrize("records, where, msg", [
    ([PAIR, {"prompt": "Add one.", "chosen": "x"}], ":2:", "no 'rejected'"),
    ([{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
       "rejected": [{"role": "user", "content": "q"}]}], ":1:", "'rejected' ends with a 'user' message"),
    ([{"prompt": "q", "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}], ":1:", "role 'bot' is not one of"),
])
def test_bad_pairs_are_one_line_errors(tmp_path, init_ckpt, records, where, msg):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    p = run_dpo(["--init", str(init_ckpt), "--data", str(f), "--out", str(tmp_path / "o")], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and f"{f}{where}" in err[0] and msg in err[0], p.stderr


def test_dpo_cli_starts_at_ln2_caches_reference_and_logs_rewards(tmp_path, init_ckpt):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({**PAIR, "prompt": f"Add {i}."}) + "\n" for i in range(6)))
    args = ["--init", str(init_ckpt), "--data", str(f), "--batch-size", "2", "--seq-len", "64", "--max-steps", "2",
            "--ref-cache", str(tmp_path / "cache"), "--log-every", "1"]
    p = run_dpo([*args, "--out", str(tmp_path / "a")], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "computed for 6 pairs" in p.stderr
    recs = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in recs if "loss" in r)
    assert first["loss"] == pytest.approx(LN2, abs=1e-4) and "reward_acc" in first
    assert "train_reward_acc" in recs[-1]
    q = run_dpo([*args, "--out", str(tmp_path / "b")], tmp_path)                 # second run: cache hit
    assert q.returncode == 0 and "DPO reference log-probs: cached" in q.stderr, q.stderr


def test_dpo_resume_after_sigkill_reproduces_losses(tmp_path, init_ckpt):
    """Kill a DPO run after step 3 (checkpoint at 2), resume it: the loss of every step equals an
    uninterrupted run's (same data order, optimizer state and reference log-probs)."""
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({**PAIR, "prompt": f"Add {i}.", "rejected": f"no {i}"}) + "\n" for i in range(9)))
    common = ["--init", str(init_ckpt), "--data", str(f), "--batch-size", "2", "--seq-len", "64", "--max-steps", "6",
              "--save-every", "2", "--log-every", "1", "--ref-cache", str(tmp_path / "cache")]

    def losses(d):
        return {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    a = run_dpo([*common, "--out", str(tmp_path / "a")], tmp_path)
    assert a.returncode == 0, a.stderr
    env_kill = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_at_step.py"), "3", str(ROOT / "sft" / "train_dpo.py"), *common, "--out", str(tmp_path / "b")],
                            cwd=tmp_path, env=env_kill, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    b = run_dpo([*common, "--out", str(tmp_path / "b"), "--resume"], tmp_path)
    assert b.returncode == 0 and "at step 2" in b.stderr, b.stderr
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(la) == [1, 2, 3, 4, 5, 6] and la == lb
    assert len(set(la.values())) == 6                                   # the loss moves: a real comparison
