"""sft/train_distill.py end to end: with alpha 0 it is exactly pretraining (same per-step losses), with
alpha 1 and the teacher as the student's init the loss starts at 0 (KL of identical models), the teacher is
not trained; a teacher with another tokenizer and bad flags get one clear line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
SMALL = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "64", "--max-steps", "3", "--log-every", "1",
         "--warmup", "1", "--kernels", "torch"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import string
    import textwrap

    from data import prepare
    src = tmp_path_factory.mktemp("corpus")
    for mod in (string, textwrap):
        (src / (mod.__name__ + ".py")).write_text(Path(mod.__file__).read_text())
    out = tmp_path_factory.mktemp("data") / "small"
    prepare(out, sources=[str(src)], tokenizer="train:512", val_fraction=0.25, progress=False)
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_dir):
    import torch

    from model import GPT, GPTConfig
    from model.io import save
    torch.manual_seed(3)
    d = tmp_path_factory.mktemp("teacher")
    save(GPT(GPTConfig(vocab_size=512, n_layer=2, n_embd=96, n_head=4, n_kv_head=2, ffn_hidden=256, max_seq_len=128)), d)
    (d / "tokenizer.json").write_bytes((data_dir / "tokenizer.json").read_bytes())
    return d


def cli(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def losses(d):
    return [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_alpha0_is_pretraining_and_alpha1_from_the_teacher_starts_at_zero(tmp_path, data_dir, teacher):
    from safetensors.torch import load_file
    before = load_file(str(teacher / "model.safetensors"))
    p = cli("train/pretrain.py", "--data", data_dir, *SMALL, "--out", tmp_path / "pre", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    d = cli("sft/train_distill.py", "--teacher", teacher, "--alpha", "0", "--data", data_dir, *SMALL,
            "--out", tmp_path / "kd0", cwd=tmp_path)
    assert d.returncode == 0, d.stderr
    assert losses(tmp_path / "kd0") == pytest.approx(losses(tmp_path / "pre"), rel=1e-5)
    # the student starts as the teacher: KL 0 at step 1, then the student moves away from it
    tiny = [a for a in SMALL if a not in ("--preset", "tiny")]
    k = cli("sft/train_distill.py", "--teacher", teacher, "--init", teacher, "--alpha", "1", "--temperature", "2",
            "--data", data_dir, *tiny, "--lr", "1e-2", "--out", tmp_path / "kd1", cwd=tmp_path)
    assert k.returncode == 0, k.stderr
    ls = losses(tmp_path / "kd1")
    assert abs(ls[0]) < 1e-5 and ls[2] > 1e-6
    after = load_file(str(teacher / "model.safetensors"))
    assert all((before[n] == after[n]).all() for n in before)          # the teacher's file is untouched
    cfg = json.loads((tmp_path / "kd1" / "config.json").read_text())
    assert cfg["distill"]["alpha"] == 1.0 and cfg["distill"]["teacher"] == str(teacher)


def test_teacher_with_another_tokenizer_and_bad_flags_are_one_line(tmp_path, data_dir, teacher):
    import shutil

    from data import train_bpe
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    train_bpe(["something else entirely " * 50], vocab_size=300).save(other)
    for args, parts in (
            (["--teacher", other], ["tokenizer mismatch", str(other)]),
            (["--teacher", teacher, "--alpha", "1.5"], ["--alpha 1.5"]),
            (["--teacher", teacher, "--temperature", "0"], ["--temperature 0"]),
            (["--teacher", tmp_path / "nope"], [str(tmp_path / "nope")])):
        p = cli("sft/train_distill.py", *args, "--data", data_dir, *SMALL, "--out", tmp_path / "o", cwd=tmp_path)
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert p.returncode == 2 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr
        assert all(s in err[0] for s in parts), err[0]
        assert not (tmp_path / "o").exists()
