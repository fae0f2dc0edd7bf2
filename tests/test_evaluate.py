"""lm-eval adapter on local offline tasks (tests/lm_eval_task/) against scores computed here by hand,
batch-size invariance, rolling log-likelihood, validation perplexity, and the evaluate.py CLI."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data import write_shard
from model import save
from test_infer import CORPUS, train_tiny

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
from infer.evaluate import run_lm_eval  # noqa: E402
from infer.lm_eval_adapter import FurnaceLM  # noqa: E402
from infer.perplexity import val_perplexity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "lm_eval_task"


@pytest.fixture(scope="module")
def trained():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield train_tiny()
    torch.set_num_threads(n)


def ref_logprob(model, tok, context: str, continuation: str) -> float:
    """Independent reference: one full forward pass, lm-eval's context/continuation token split (trailing
    spaces of the context move to the continuation)."""
    n_sp = len(context) - len(context.rstrip())
    if n_sp:
        context, continuation = context[:-n_sp], context[-n_sp:] + continuation
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole]))[0][0].float(), -1)   # (T, V)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


def test_local_tasks_match_hand_computed_scores(trained):
    model, tok = trained
    docs = [json.loads(line) for line in (TASKS / "furnace_local_mc.jsonl").read_text().splitlines()]
    acc = acc_norm = 0.0
    for d in docs:
        lls = [ref_logprob(model, tok, d["question"], " " + c) for c in d["choices"]]
        acc += max(range(len(lls)), key=lls.__getitem__) == d["label"]
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(d["choices"][i])) == d["label"]
    acc, acc_norm = acc / len(docs), acc_norm / len(docs)
    gen_docs = [json.loads(line) for line in (TASKS / "furnace_local_gen.jsonl").read_text().splitlines()]
    em = 0.0
    for d in gen_docs:  # greedy by full recomputation (no cache), cut at the first '.'
        seq = tok.encode(d["prompt"])
        n = len(seq)
        for _ in range(12):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
            if "." in tok.decode(seq[n:]) or seq[-1] == tok.eos_id:
                break
        text = tok.decode([t for t in seq[n:] if t != tok.eos_id]).split(".")[0]
        em += text.lstrip() == d["answer"]
    em /= len(gen_docs)

    lm = FurnaceLM(model, tok, batch_size=4)
    out = run_lm_eval(lm, ["furnace_local_mc", "furnace_local_gen"], include_path=str(TASKS))
    res = out["results"]
    assert res["furnace_local_mc"]["acc,none"] == pytest.approx(acc)
    assert res["furnace_local_mc"]["acc_norm,none"] == pytest.approx(acc_norm)
    assert res["furnace_local_gen"]["exact_match,strip"] == pytest.approx(em)
    assert acc >= 0.8 and em >= 0.6          # the trained model knows the text: far above chance (1/3, 0)
    assert out["versions"]["furnace_local_mc"] == 1.0 and out["batch_size"] == 4


class _Req:
    def __init__(self, *args):
        self.args = args


def test_batch_1_and_8_agree_and_rolling_matches_reference(trained):
    model, tok = trained
    reqs = [_Req(CORPUS[:k], CORPUS[k:k + 9]) for k in range(5, 400, 23)]
    a = FurnaceLM(model, tok, batch_size=1).loglikelihood(reqs)
    b = FurnaceLM(model, tok, batch_size=8).loglikelihood(reqs)
    assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) < 1e-4
    assert [x[1] for x in a] == [y[1] for y in b]
    for (ll, _), r in zip(a[:4], reqs[:4]):
        assert ll == pytest.approx(ref_logprob(model, tok, *r.args), abs=1e-4)
    # Rolling log-likelihood of a short text = sum of log p(t_i | <eot>, t_<i).
    text = "the dog ran to the park."
    ids = [tok.eos_id] + tok.encode(text)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0][0], -1)
    ref = sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))
    long_text = CORPUS * 4                                              # longer than the 128-token context
    r1 = FurnaceLM(model, tok, batch_size=1).loglikelihood_rolling([_Req(text), _Req(long_text)])
    r8 = FurnaceLM(model, tok, batch_size=8).loglikelihood_rolling([_Req(text), _Req(long_text)])
    assert r1[0] == pytest.approx(ref, abs=1e-4)
    assert r1[1] == pytest.approx(r8[1], abs=1e-3) and r1[1] < 0


def test_val_perplexity_and_cli(trained, tmp_path):
    model, tok = trained
    data = tmp_path / "data"
    data.mkdir()
    val = tok.encode(CORPUS * 3)
    write_shard(data / "val_000000.bin", val)
    write_shard(data / "train_000000.bin", val)
    tok.save(data)
    p = val_perplexity(model, str(data), tok, seq_len=64)
    nll, n = 0.0, 0
    with torch.no_grad():  # reference: windows of 65 tokens overlapping by one
        for s in range(0, len(val) - 1, 64):
            w = torch.tensor([val[s:s + 65]])
            logp = F.log_softmax(model(w[:, :-1])[0][0], -1)
            nll -= logp.gather(1, w[0, 1:, None]).sum().item()
            n += w.shape[1] - 1
    assert p["tokens"] == n == len(val) - 1
    assert p["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert p["ppl"] < 3                                                 # it learned this text

    ck = tmp_path / "ck"
    save(model, ck)
    tok.save(ck)
    out_file = tmp_path / "res.json"
    r = subprocess.run([sys.executable, str(ROOT / "infer" / "evaluate.py"), "--ckpt", str(ck), "--tasks",
                        "furnace_local_mc", "--include-path", str(TASKS), "--offline", "--ppl", str(data),
                        "--ppl-seq-len", "64", "--batch-size", "8", "--threads", "1", "--output", str(out_file)],
                       capture_output=True, text=True, cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out_file.read_text())
    assert summary["lm_eval"]["results"]["furnace_local_mc"]["acc,none"] >= 0.8
    assert summary["lm_eval"]["n-shot"]["furnace_local_mc"] == 0 and summary["lm_eval"]["chat_template"] is False
    assert summary["perplexity"]["ppl"] == pytest.approx(p["ppl"], rel=1e-4)
    r = subprocess.run([sys.executable, str(ROOT / "infer" / "evaluate.py"), "--ckpt", str(ck), "--tasks",
                        "no_such_task_xyz", "--include-path", str(TASKS), "--offline", "--output", str(out_file)],
                       capture_output=True, text=True, cwd="/", timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "already exists" in r.stderr
