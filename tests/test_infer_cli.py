"""infer/chat.py driven through stdin as a subprocess: one-shot, a two-turn session, completion, bad input."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infer import ChatSession, CompletionSession
from model import GPT, save
from test_infer import train_tiny  # the trained tiny model (tests/ is on sys.path under pytest)

ROOT = Path(__file__).resolve().parents[1]
CHAT = str(ROOT / "infer" / "chat.py")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = train_tiny()
    torch.set_num_threads(n)
    d = tmp_path_factory.mktemp("ck") / "run" / "checkpoints" / "step_00000080"
    save(model, d)
    tok.save(d)
    return d, model, tok


def start(args, stdin=None):
    """Start a chat.py process from an unrelated folder (the scripts must run from anywhere)."""
    return subprocess.Popen([sys.executable, CHAT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/")


def finish(p, stdin=None):
    out, err = p.communicate(stdin, timeout=120)
    return p.returncode, out, err


def reference_answers(model, tok, turns, **kw):
    s = ChatSession(model, tok, write=lambda _: None, notice=lambda _: None, **kw)
    return [s.respond(t)[0] for t in turns]


def test_one_shot_two_turn_and_complete(ckpt):
    d, model, tok = ckpt
    run_dir = d.parents[1]                                             # a run dir resolves to its newest checkpoint
    common = ["--dtype", "fp32", "--max-new-tokens", "12", "--threads", "1", "--compile", "off"]
    procs = [
        start(["--ckpt", str(d), "--prompt", "the cat sat on the", *common]),
        start(["--ckpt", str(run_dir), "--system", "be brief", *common]),
        start(["--ckpt", str(d), "--complete", "--prompt", "the dog ran to the", "--max-new-tokens", "6",
               "--compile", "on"]),
    ]
    stdin = [None, "the cat sat on the\n\n/unknown\none two three\n/stats\n/quit\nnever read\n", None]
    results = [finish(p, s) for p, s in zip(procs, stdin)]
    for rc, out, err in results:
        assert rc == 0 and "Traceback" not in err, err
    assert "decode: compiled in" in results[2][2]

    (one, _, _), (two, _, err2), (comp, _, _) = [(o, r, e) for r, o, e in results]
    assert one == reference_answers(model, tok, ["the cat sat on the"], max_new_tokens=12)[0] + "\n"
    expected = reference_answers(model, tok, ["the cat sat on the", "one two three"], system="be brief",
                                 max_new_tokens=12)
    # stdout holds only the conversation: the answers, a blank line between piped answers, no log line
    assert two == "\n".join(a + "\n" for a in expected)                 # the history carried into turn 2
    assert "unknown command" in err2 and "/quit" in err2                # the help lists what works
    assert "kernels: " in err2 and "attention: " in err2                # the runtime choices, on stderr
    assert f"[stats: {len(tok.encode(expected[1]))} tokens in " in err2
    # a checkpoint that never went through sft/ says so in chat mode, not in --complete mode
    assert "not fine-tuned for chat" in err2 and "--complete" in err2
    assert "not fine-tuned for chat" not in results[2][2]
    # Plain continuation of the learned text; the CLI's default int8 with the compiled decode step keeps it.
    assert comp.startswith(" park.")


def test_bad_inputs_one_line_errors(ckpt, tmp_path):
    d, model, tok = ckpt
    corrupt = tmp_path / "corrupt"
    save(model, corrupt)
    tok.save(corrupt)
    raw = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    no_tok = tmp_path / "no_tok"
    save(GPT(model.config), no_tok)
    cases = [
        (["--ckpt", str(tmp_path / "missing")], "no such file"),
        (["--ckpt", str(corrupt)], "truncated"),
        (["--ckpt", str(no_tok)], "tokenizer.json"),
        (["--ckpt", str(d), "--temperature", "-1"], "--temperature"),
        (["--ckpt", str(d), "--top-p", "2"], "--top-p"),
        (["--ckpt", str(d), "--max-new-tokens", "0"], "--max-new-tokens"),
    ]
    procs = [start([*args, "--prompt", "hi", "--threads", "1"]) for args, _ in cases]
    for p, (args, needle) in zip(procs, cases):
        rc, out, err = finish(p)
        assert rc == 2, (args, err)
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last, (args, err)


def test_prompt_longer_than_context_is_cut_with_notice(ckpt):
    d, model, tok = ckpt
    rc, out, err = finish(start(["--ckpt", str(d), "--prompt", "a b c d e f g " * 60, "--max-new-tokens", "4",
                                 "--threads", "1", "--compile", "off"]))
    assert rc == 0 and "kept the last" in err and "Traceback" not in err
    s = CompletionSession(model, tok, write=lambda _: None, notice=lambda _: None, max_new_tokens=4)
    assert len(s._truncate(list(range(500)), s.prompt_budget())) == s.prompt_budget()
