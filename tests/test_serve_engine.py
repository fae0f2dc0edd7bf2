"""The pieces under infer/serve.py: rows of one KV cache at different positions (model) against the unbatched
path, the answer text (stop strings, reasoning split, streaming deltas), the serve.py command's bad input."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import train_bpe
from data.chat_template import CHAT_TOKENS
from infer.api import AnswerText
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@torch.inference_mode()
def test_rows_at_different_positions_equal_the_unbatched_cache(n_kv_head):
    """Three sequences of different lengths decoded as one batch (hidden_states' row_pos), with a two-token
    chunk as well, give the logits of each sequence decoded alone with the usual cache."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_layer=2, n_embd=64, n_head=4, n_kv_head=n_kv_head, ffn_hidden=128,
                          max_seq_len=64, kernels="torch")).eval()
    seqs = [torch.randint(0, 97, (n,)) for n in (5, 13, 9)]
    steps = [[1], [2, 3], [4]]                           # tokens fed after each prompt, in chunks
    solo = []
    for s in seqs:
        c = model.new_cache(1, 64)
        out = [model(s[None], cache=c)[0][0, -1]]
        for chunk in steps:
            out.append(model(torch.tensor([chunk]), cache=c)[0][0, -1])
        solo.append(out)
    cache = model.new_cache(4, 64)                       # one spare row: the batch is the cache's first rows
    got = [[model(s[None], cache=cache.rows(i, i + 1))[0][0, -1]] for i, s in enumerate(seqs)]
    pos = torch.tensor([len(s) for s in seqs])
    for chunk in steps:
        x = torch.tensor([chunk] * 3)                                          # (3, T)
        h = model.hidden_states(x, cache, row_pos=pos)                          # (3, T, d)
        for i in range(3):
            got[i].append(model.lm_head(h[i, -1]))
        pos += len(chunk)
    for a, b in zip(solo, got):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    # a row moved to another slot (a request before it left) continues exactly as before
    cache.copy_row(2, 0, int(pos[2]))
    h = model.hidden_states(torch.tensor([[7]]), cache, row_pos=pos[2:])
    c = model.new_cache(1, 64)
    model(torch.cat([seqs[2], torch.tensor([1, 2, 3, 4])])[None], cache=c)
    torch.testing.assert_close(model.lm_head(h[0, -1]), model(torch.tensor([[7]]), cache=c)[0][0, -1],
                               atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tok():
    t = train_bpe(["the cat sat on the mat. hello world, thinking about it.\n"] * 20, vocab_size=300)
    t.add_special_tokens(list(CHAT_TOKENS))
    return t


def run(tok, text, stops=(), reasoning=False):
    """Feed `text` token by token: (streamed reasoning, streamed content, visible at the end, stopped)."""
    a = AnswerText(tok, list(stops), reasoning)
    r = c = ""
    for t in tok.encode(text):
        dr, dc = a.push(t)
        r, c = r + dr, c + dc
        if a.stopped:
            break
    dr, dc = a.finish()
    return r + dr, c + dc, a.visible(True), a.stopped


def test_answer_text_stop_strings(tok):
    r, c, vis, stopped = run(tok, "the cat sat on the mat. hello", stops=["on the", "zzz"])
    assert (r, c, stopped) == ("", "the cat sat ", True) and vis == ("", c)
    r, c, _, stopped = run(tok, "the cat sat", stops=["sat on"])   # a held-back tail that never completes
    assert (c, stopped) == ("the cat sat", False)


def test_answer_text_reasoning_split(tok):
    text = "<think>\nthinking about it\n</think>\nhello world"
    assert run(tok, text, reasoning=True)[:2] == ("thinking about it", "hello world")
    assert run(tok, text, reasoning=False)[:2] == ("", text)          # not asked: the text stays as it is
    assert run(tok, "hello world", reasoning=True)[:2] == ("", "hello world")
    assert run(tok, "<think>\nunfinished", reasoning=True)[:2] == ("unfinished", "")
    r, c, _, _ = run(tok, "<think>\nthe cat\n</think>\nhello world. the end", stops=["the end"], reasoning=True)
    assert (r, c) == ("the cat", "hello world. ")


def test_serve_command_bad_input_is_one_line(tmp_path):
    for args, needle in ((["--ckpt", str(tmp_path / "nope")], "nope"),
                         (["--ckpt", str(tmp_path), "--port", "70000"], "--port 70000"),
                         (["--ckpt", str(tmp_path), "--max-slots", "0"], "--max-slots 0")):
        p = subprocess.run([sys.executable, str(ROOT / "infer" / "serve.py"), *args], capture_output=True, text=True,
                           timeout=120, cwd="/")
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
