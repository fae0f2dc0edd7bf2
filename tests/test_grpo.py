"""GRPO: advantages and loss against hand-computed values and against TRL's own loss code, ratio 1 / KL 0 at
the first update, batched sampling against one-at-a-time sampling, the mean reward rising on the default task,
exact resume after SIGKILL in the middle of --num-iterations, and the command's bad-input errors."""
import copy
import json
import math
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data import train_bpe
from data.chat_template import encode_chat, ensure_chat_tokens, stop_ids
from infer.generation import generate, generate_batch
from model import GPT, GPTConfig
from sft.examples import IGNORE, build_sft_example
from sft.grpo import GRPOTask, PromptLoader, group_advantages, grpo_loss, rollout_rows, token_logps
from sft.packing import PackedSFTLoader
from sft.rewards import arithmetic_problems, exact_answer, final_answer, parse_rewards, score, think_format
from train.options import TrainOptions
from train.task import LMTask
from train.trainer import Trainer
from kernels.common import FurnaceError
from grpo_rewards import length

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- pure functions ---------------------------------------------------------------------------------------
def test_group_advantages_hand_computed_and_equal_rewards_give_zero():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    adv = group_advantages(r, 4)
    # group 0: mean 0.5, sample std sqrt((4 * 0.25) / 3) = 0.57735
    s = math.sqrt(1 / 3)
    a = 0.5 / (s + 1e-4)
    assert adv[:4].tolist() == pytest.approx([a, -a, -a, a], rel=1e-6)
    assert adv[4:8].tolist() == [0.0, 0.0, 0.0, 0.0] and torch.isfinite(adv).all()   # equal rewards: 0, no NaN
    # group 2: mean 0.75, std sqrt((2.25^2 + 3 * 0.75^2) / 3) = 1.5
    assert adv[8:].tolist() == pytest.approx([2.25 / 1.5001, -0.75 / 1.5001, -0.75 / 1.5001, -0.75 / 1.5001], rel=1e-6)


def test_grpo_loss_hand_computed():
    # two completions, the first 2 tokens long, the second 1 (one padded position)
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    old = torch.tensor([[-1.0, -2.5], [-0.1, 0.0]])
    ref = torch.tensor([[-1.2, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -2.0])
    loss, mets = grpo_loss(logps, old, ref, adv, mask, beta=0.1, epsilon=0.2)
    # token (0,0): ratio 1 -> pg -1; kl exp(-0.2)+0.2-1
    # token (0,1): ratio e^0.5 = 1.6487 > 1.2, A > 0 -> clipped: pg -1.2
    # token (1,0): ratio e^-0.4 = 0.6703 < 0.8, A < 0 -> min(0.6703*-2, 0.8*-2) = -1.6 -> pg 1.6 (clipped)
    kl00 = math.exp(-0.2) + 0.2 - 1
    want = (-1.0 + 0.1 * kl00 + -1.2 + 0.0 + 1.6 + 0.0) / 3
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert mets["kl"] == pytest.approx(kl00 / 3, rel=1e-5)
    assert mets["clip_frac"] == pytest.approx(2 / 3)
    # equal rewards in every group: zero advantages -> the loss is the KL term only, finite
    z, _ = grpo_loss(logps, old, ref, group_advantages(torch.ones(2), 2), mask, beta=0.1)
    assert z.item() == pytest.approx(0.1 * kl00 / 3, rel=1e-5)


def _trl_loss(logps, old, ref, adv, mask, beta, eps, loss_type):
    """TRL's GRPOTrainer._compute_loss itself (trl 1.16), on a stand-in trainer whose model returns our
    per-token log-probs. 'bnpo' = token mean over the batch; 'grpo' = per-sequence mean, then mean."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    metrics = {"train": defaultdict(list)}
    acc = SimpleNamespace(reduce=lambda t, reduction: t, gather=lambda t: t, gather_for_metrics=lambda t: t,
                          num_processes=1, sync_gradients=True)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        accelerator=acc, _metrics=metrics)
    N, T = logps.shape
    inputs = {"prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1, dtype=torch.long),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, metrics["train"]


def test_objective_equals_trl_grpo_trainer_loss():
    """Our loss == TRL's GRPOTrainer._compute_loss (the real package, loss_type 'bnpo': token-level over the
    batch, our normalisation) on the same log-probs, with clipping active; KL and clip fraction too."""
    g = torch.Generator().manual_seed(0)
    N, T = 6, 5
    logps = -torch.rand(N, T, generator=g) * 3
    old = logps + 0.4 * torch.randn(N, T, generator=g)
    ref = logps + 0.3 * torch.randn(N, T, generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([5, 3, 1, 4, 5, 2])[:, None]).long()
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 0.0]), 3)
    ours, mets = grpo_loss(logps, old, ref, adv, mask, beta=0.04, epsilon=0.2)
    theirs, tm = _trl_loss(logps, old, ref, adv, mask, 0.04, 0.2, "bnpo")
    assert 0 < mets["clip_frac"] < 1                                        # the comparison covers clipping
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    assert mets["kl"] == pytest.approx(tm["kl"][0], rel=1e-6)
    assert mets["clip_frac"] == pytest.approx(tm["clip_ratio/region_mean"][0], rel=1e-6)


def test_rewards_builtin_and_errors_name_the_function():
    assert final_answer("<think>\n3 + 4 = 7\n</think>\nThe answer is 7.") == "7"
    assert exact_answer("", "7", "7") == 1.0 and exact_answer("", "17", "7") == 0.0 and exact_answer("", "x", "7") == 0.0
    assert think_format("", "<think>\nhm\n</think>\n7", "7") == 1.0
    assert think_format("", "<think>\nhm\n</think>\n", "7") == 0.0 and think_format("", "7", "7") == 0.0
    assert [(n, w) for n, _, w in parse_rewards("answer:1,format:0.5")] == [("answer", 1.0), ("format", 0.5)]
    with pytest.raises(FurnaceError, match="--reward bogus: unknown reward function; built in: format, answer"):
        parse_rewards("answer,bogus")
    with pytest.raises(FurnaceError, match="weight 'x' is not a number"):
        parse_rewards("answer:x")

    def boom(p, c, a):
        raise ValueError("bad")
    with pytest.raises(FurnaceError, match="reward function 'boom' raised ValueError: bad"):
        score([("boom", boom, 1.0)], ["p"], ["c"], ["a"])
    with pytest.raises(FurnaceError, match="reward function 'nan' returned nan"):
        score([("nan", lambda p, c, a: float("nan"), 1.0)], ["p"], ["c"], ["a"])


def test_default_sft_data_teaches_the_grpo_format_on_training_problems_only(tmp_path, monkeypatch, tok):
    """The default SFT file holds ARITH_SFT arithmetic conversations: prompts from the GRPO task's training
    problems (none of its held-out ones), and replies that, tokenized by the SFT template and decoded as GRPO
    decodes a completion, get full marks from the real default rewards."""
    import inspect

    from sft import defaults
    from sft.formats import sft_messages
    from sft.rewards import DEFAULT_REWARDS, arithmetic_conversations
    monkeypatch.setattr(defaults, "stdlib_functions",             # a few real functions instead of the whole stdlib
                        lambda: defaults.functions_in(Path(inspect.__file__).read_text(), "inspect.py"))
    defaults.build_default_datasets(tmp_path / "sft", tmp_path / "dpo")
    msgs = [sft_messages(json.loads(ln)) for ln in (tmp_path / "sft" / "train.jsonl").read_text().splitlines()]
    arith = [m for m in msgs if m[0]["content"].startswith("What is ")]
    assert len(arith) == defaults.ARITH_SFT == 400 and len(msgs) > len(arith)          # the stdlib part stays
    assert arith == [sft_messages({"conversations": c}) for c in arithmetic_conversations(400, defaults.ARITH_SEED)]
    train, val = arithmetic_problems()
    prompts = {m[0]["content"] for m in arith}
    assert prompts <= {r["prompt"] for r in train} and not prompts & {r["prompt"] for r in val}
    assert len(prompts) > 50                                                  # most of the 64 training problems
    tiny_model(tok)                                                           # the chat tokens
    texts, answers = [], []
    for m in arith:
        ids, labels = build_sft_example(tok, m, 64)
        start = next(i for i, lb in enumerate(labels) if lb != IGNORE)        # the reply follows GRPO's prompt
        assert ids[:start] == encode_chat(tok, m[:1], add_generation_prompt=True)
        texts.append(tok.decode([t for t, lb in zip(ids, labels) if lb != IGNORE and t not in stop_ids(tok)]))
        a, op, b = m[0]["content"][8:-1].split()                              # "What is 7 - 5?" -> 7, -, 5
        answers.append(str(int(a) + int(b) if op == "+" else int(a) - int(b)))
    assert texts[0].startswith("<think>")
    assert score(parse_rewards(DEFAULT_REWARDS), [m[0]["content"] for m in arith], texts, answers) == [[1.0, 1.0]] * 400


# ---- a tiny model on the default task -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    train, _ = arithmetic_problems()
    t = train_bpe([f"{r['prompt']} {r['answer']}" for r in train], vocab_size=300)
    return t


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                      max_seq_len=64, kernels="torch"))
    ensure_chat_tokens(tok, m)
    return m


def items(tok, recs):
    return [(encode_chat(tok, [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True), r["prompt"],
             r["answer"]) for r in recs]


def make_task(tok, model, recs, *, P=4, G=4, mu=1, beta=0.04, max_new=8, val=None, rewards="answer:1,format:0.5"):
    return GRPOTask(PromptLoader(items(tok, recs), P, 1, mu, seed=0), model,
                    copy.deepcopy(model).eval().requires_grad_(False), tok, parse_rewards(rewards), num_generations=G,
                    max_new_tokens=max_new, temperature=1.0, top_p=None, beta=beta, epsilon=0.2,
                    stop_ids=stop_ids(tok), seed=0, val=val)


def test_batched_sampling_equals_one_at_a_time(tok):
    model = tiny_model(tok).eval()
    its = [it[0] for it in items(tok, arithmetic_problems()[0][:4])]
    prompts = [its[0], its[0], its[0], *its[1:], [5, 6, 7]]                # a run of equal prompts (shared prefill)
    assert len({len(p) for p in prompts}) > 1                              # rows at different positions
    seeds = list(range(100, 100 + len(prompts)))
    stops = stop_ids(tok)
    for temperature, top_p in ((1.0, None), (0.8, 0.9), (0.0, None)):
        batched = generate_batch(model, prompts, 12, temperature, None, top_p, stops, seeds)
        single = [generate(model, p, 12, temperature, None, top_p, stop_ids=stops, seed=s) for p, s in zip(prompts, seeds)]
        assert batched == single
    assert len({tuple(b) for b in batched}) > 1


def test_ratio_one_and_kl_zero_at_first_update_then_old_logps_kept(tok):
    model = tiny_model(tok)
    task = make_task(tok, model, arithmetic_problems()[0], mu=2, rewards="answer:1,format:0.5")
    task.rewards.append(("length", length, 1.0))                          # random weights: rewards that differ
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ld = task.train_loader
    b0 = ld.next_batch()
    n = task.count(b0)
    loss, m0 = task.loss(model, b0)
    assert n == int((ld.slots[0]["y"] != IGNORE).sum()) > 0
    assert m0["ratio"] == 1.0 and m0["clip_frac"] == 0.0 and m0["kl"] == 0.0      # policy == old == reference
    old = ld.slots[0]["old"].clone()
    loss.backward()
    opt.step()
    opt.zero_grad()
    b1 = ld.next_batch()                                                   # iteration 1: the same samples
    assert b1 == {"slot": 0, "iteration": 1} and task.count(b1) == n
    _, m1 = task.loss(model, b1)
    assert m1["ratio"] != 1.0 and m1["kl"] > 0 and torch.equal(ld.slots[0]["old"], old)
    b2 = ld.next_batch()                                                   # a new batch: new samples, ratio 1 again
    assert b2["iteration"] == 0
    task.count(b2)
    _, m2 = task.loss(model, b2)
    assert m2["ratio"] == 1.0 and m2["kl"] > 0


def test_token_logps_match_a_per_row_forward(tok):
    model = tiny_model(tok).eval()
    its = items(tok, arithmetic_problems()[0][:3])
    comps = [[10, 11, 12], [13], [14, 15]]
    x, y = rollout_rows([i[0] for i in its], comps, tok.eos_id)
    with torch.no_grad():
        got = token_logps(model, x, y)
        for i, (it, c) in enumerate(zip(its, comps)):
            seq = it[0] + c
            lp = torch.log_softmax(model(torch.tensor([seq]))[0][0].double(), -1)
            want = [lp[len(it[0]) - 1 + k, t].item() for k, t in enumerate(c)]
            assert got[i][y[i] != IGNORE].tolist() == pytest.approx(want, abs=1e-5)


def sft_briefly(tok, model, steps=40, think=0.5):
    """A few SFT steps on the default task's prompts (correct answers; half the replies with a <think> block)
    so that the tiny model has a format to sharpen; its replies are still mostly wrong."""
    rng = random.Random(0)
    ex = []
    for r in arithmetic_problems()[0]:
        reply = {"role": "assistant", "content": r["answer"]}
        if rng.random() < think:
            reply["reasoning"] = f"{r['prompt'][8:-1]} = {r['answer']}"
        ex.append(build_sft_example(tok, [{"role": "user", "content": r["prompt"]}, reply], 64))
    opts = TrainOptions(max_steps=steps, lr=3e-3, min_lr=3e-3, schedule="constant", log_every=1000)
    return opts, LMTask(PackedSFTLoader(ex, 8, 64, tok.eos_id))


def test_mean_reward_rises_on_the_default_task(tmp_path, tok):
    """Measured (seed 0, 2-core CPU): mean reward of the first 5 steps 0.18, of the last 5 steps 0.44 (the
    format reward 0.15 -> 0.82 over the same steps, the answer reward stays near chance). Asserted: +0.15."""
    model = tiny_model(tok)
    opts, lm = sft_briefly(tok, model)
    (tmp_path / "sft").mkdir()
    Trainer(opts, lm, model, run_dir=tmp_path / "sft").fit()
    task = make_task(tok, model, arithmetic_problems()[0], P=8, G=8, max_new=16)
    opts = TrainOptions(max_steps=30, lr=3e-3, min_lr=3e-3, schedule="constant", log_every=1000, grad_clip=1.0)
    (tmp_path / "grpo").mkdir()
    Trainer(opts, task, model, run_dir=tmp_path / "grpo").fit()
    recs = [json.loads(ln) for ln in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rew = [r["reward"] for r in recs if "reward" in r]
    assert len(rew) == 30
    first, last = sum(rew[:5]) / 5, sum(rew[-5:]) / 5
    assert last - first > 0.15, rew
    assert {"reward_answer", "reward_format", "completion_len", "kl", "clip_frac", "sample_tok_s", "train_tok_s"} <= recs[0].keys()


# ---- the command ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory, tok):
    from model.io import save
    d = tmp_path_factory.mktemp("grpo_init")
    save(tiny_model(tok), d)
    tok.save(d)
    return d


def run_grpo(args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "sft" / "train_grpo.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


REC = {"prompt": "What is 1 + 2?", "answer": "3"}


@pytest.mark.parametrize("lines, where, msg", [
    ([json.dumps(REC), "{not json"], ":2:", "JSON"),
    ([json.dumps(REC), json.dumps({"prompt": "What is 1 + 1?"})], ":2:", "no 'answer'"),
    ([json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                  "answer": "1"})], ":1:", "must end with the user's turn"),
    ([json.dumps(REC), json.dumps(REC), json.dumps({"prompt": "What is " + "1 + " * 40 + "1?", "answer": "41"})], ":3:",
     "leaves no room for --max-new-tokens"),
])
def test_malformed_prompt_files_are_one_line_errors(tmp_path, init_ckpt, lines, where, msg):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n")
    p = run_grpo(["--init", str(init_ckpt), "--data", str(f), "--seq-len", "64", "--out", str(tmp_path / "o")], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and f"{f}{where}" in err[0] and msg in err[0], p.stderr
    assert not (tmp_path / "o").exists()


def test_bad_reward_name_is_a_one_line_error(tmp_path, init_ckpt):
    p = run_grpo(["--init", str(init_ckpt), "--reward", "answer,nope", "--out", str(tmp_path / "o")], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--reward nope: unknown reward function" in p.stderr


def test_resume_after_sigkill_mid_iterations_reproduces_every_step(tmp_path, init_ckpt):
    """--num-iterations 2, checkpoint after step 3 (the first update on batch 2), killed after step 4: the
    resumed run reuses the saved samples and old log-probs, and every step's loss, reward and KL equal an
    uninterrupted run's. The default task (no --data) is used."""
    common = ["--init", str(init_ckpt), "--batch-size", "2", "--num-generations", "4", "--max-new-tokens", "6",
              "--seq-len", "64", "--max-steps", "6", "--num-iterations", "2", "--save-every", "3", "--log-every", "1",
              "--lr", "3e-3", "--reward", "answer,format:0.5,tests.grpo_rewards.length"]   # length: rewards differ

    def steps(d):
        return {r["step"]: (r["loss"], r["reward"], r.get("kl"), r["ratio"])
                for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    a = run_grpo([*common, "--out", str(tmp_path / "a")], tmp_path)
    assert a.returncode == 0, a.stderr
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_at_step.py"), "4", str(ROOT / "sft" / "train_grpo.py"),
                             *common, "--out", str(tmp_path / "b")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    b = run_grpo([*common, "--out", str(tmp_path / "b"), "--resume"], tmp_path)
    assert b.returncode == 0 and "at step 3" in b.stderr, b.stderr
    sa, sb = steps(tmp_path / "a"), steps(tmp_path / "b")
    assert sorted(sa) == [1, 2, 3, 4, 5, 6] and sa == sb
    assert [sa[s][3] == 1.0 for s in sa] == [True, False] * 3                 # ratio 1 at each batch's first update
    assert len(set(sa.values())) == 6 and sa[6][2] > 0, sa                    # the run moves: a real comparison
    # resuming with other GRPO options is refused by the one resume check (train.checkpoint.check_out_dir)
    before = (tmp_path / "b" / "metrics.jsonl").read_text()
    c = run_grpo([*common, "--num-generations", "3", "--out", str(tmp_path / "b"), "--resume"], tmp_path)
    assert c.returncode == 2 and "Traceback" not in c.stderr, c.stderr
    assert "options differ from the saved run (num_generations: 4 -> 3)" in c.stderr, c.stderr
    (tmp_path / "b" / "config.json").write_text("{damaged")                   # a damaged run folder: one line
    c = run_grpo([*common, "--out", str(tmp_path / "b"), "--resume"], tmp_path)
    assert c.returncode == 2 and "Traceback" not in c.stderr and "config.json: not valid JSON" in c.stderr, c.stderr
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == before            # nothing written by either
