"""train/pretrain.py end to end on CPU: the job, exact resume after SIGKILL, DDP, FP8 (torchao), bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train" / "pretrain.py")
FAST = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "64", "--lr", "3e-3", "--warmup", "2",
        "--log-every", "1", "--eval-tokens", "512"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small corpus of real text (some stdlib modules), prepared with a small BPE."""
    from data import prepare
    import string, textwrap, json as _json, argparse as _argparse
    src = tmp_path_factory.mktemp("corpus")
    for mod in (string, textwrap, _json.decoder, _argparse):
        (src / (mod.__name__.replace(".", "_") + ".py")).write_text(Path(mod.__file__).read_text())
    out = tmp_path_factory.mktemp("data") / "small"
    prepare(out, sources=[str(src)], tokenizer="train:512", val_fraction=0.25, progress=False)
    return out


def run(args, cwd=None, env=None, check=True, timeout=300, kill_at_step=None):
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    killer = [str(ROOT / "tests" / "kill_at_step.py"), str(kill_at_step)] if kill_at_step is not None else []
    p = subprocess.run([sys.executable, *killer, SCRIPT, *args], cwd=cwd or ROOT, env=e, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def losses(run_dir):
    recs = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_job_trains_evaluates_and_writes_a_loadable_checkpoint(tmp_path, data_dir):
    out = tmp_path / "run"
    p = run([*FAST, "--data", str(data_dir), "--out", str(out), "--max-steps", "12", "--eval-every", "6"])
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= r.keys() for r in steps)
    assert "mfu" not in steps[0]                       # unknown peak on CPU: no made-up MFU
    vals = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    assert list(vals) == [0, 6, 12] and vals[12] < vals[0] - 0.3   # evaluated before, during, after; it learned
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 12 and "torch" in cfg["versions"] and "device" in cfg
    from data import load_tokenizer
    from model import load
    m = load(out)                                      # the run dir -> its newest checkpoint
    tok = load_tokenizer(out / "checkpoints" / "step_00000012")
    assert m.config.vocab_size % 64 == 0 and m.config.vocab_size >= tok.vocab_size
    ids = torch.tensor([tok.encode("def main():\n    return")])
    logits, _ = m(ids)
    assert torch.isfinite(logits).all()
    assert "Traceback" not in p.stderr


def test_resume_after_sigkill_reproduces_losses_exactly(tmp_path, data_dir):
    common = [*FAST, "--data", str(data_dir), "--max-steps", "10", "--save-every", "3", "--keep-last", "2"]
    run([*common, "--out", str(tmp_path / "a")])
    killed = run([*common, "--out", str(tmp_path / "b")], kill_at_step=7, check=False)
    assert killed.returncode == -9                                  # really killed, mid-run
    ck = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ck == ["step_00000003", "step_00000006"]                 # keep-last 2; nothing after step 6
    assert max(losses(tmp_path / "b")) == 7                         # step 7 was logged, then the kill
    run([*common, "--out", str(tmp_path / "b"), "--resume"])
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert list(b) == list(range(1, 11))                            # the killed tail was replaced, not doubled
    assert a == b                                                   # bit-identical per-step losses


def test_out_dir_with_another_run_is_refused_and_untouched(tmp_path, data_dir):
    out = tmp_path / "run"
    run([*FAST, "--data", str(data_dir), "--out", str(out), "--max-steps", "2"])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    p = run([*FAST, "--data", str(data_dir), "--out", str(out), "--max-steps", "2"], check=False)
    assert p.returncode != 0 and "already holds a training run" in p.stderr and "Traceback" not in p.stderr
    p = run([*FAST, "--data", str(data_dir), "--out", str(out), "--max-steps", "4", "--seed", "7", "--resume"],
            check=False)
    assert p.returncode != 0 and "seed" in p.stderr and "Traceback" not in p.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--seq-len", "4096"], "exceeds the model's context"),
    (["--fp8", "--fp8-backend", "te", "--fp8-strict"], "--fp8-strict"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--config", "/nonexistent.toml"], "--config"),
])
def test_bad_input_one_line_error(tmp_path, data_dir, args, message):
    base = [*FAST, "--data", str(data_dir), "--out", str(tmp_path / "r"), "--max-steps", "1"]
    p = run([*base, *args], check=False)
    assert p.returncode != 0, p.stdout + p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    p = run(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), "--max-steps", "1"], check=False)
    assert p.returncode != 0 and str(tmp_path / "empty") in p.stderr and "Traceback" not in p.stderr


def test_tokenizer_mismatch_with_init(tmp_path, data_dir):
    from data import prepare
    src = tmp_path / "other"
    src.mkdir()
    (src / "a.txt").write_text("completely different text " * 200)
    (src / "b.txt").write_text("another document with other words " * 200)
    other = tmp_path / "other_data"
    prepare(other, sources=[str(src)], tokenizer="train:300", val_fraction=0.5, progress=False)
    run([*FAST, "--data", str(other), "--out", str(tmp_path / "r1"), "--max-steps", "1"])
    p = run([*FAST, "--data", str(data_dir), "--out", str(tmp_path / "r2"), "--max-steps", "1",
             "--init", str(tmp_path / "r1")], check=False)
    assert p.returncode != 0 and "tokenizer" in p.stderr and "Traceback" not in p.stderr


def test_fp8_torchao_on_cpu_tracks_full_precision(tmp_path, data_dir):
    common = [*FAST, "--data", str(data_dir), "--max-steps", "30", "--eval-every", "0"]
    run([*common, "--out", str(tmp_path / "fp32")])
    p = run([*common, "--out", str(tmp_path / "fp8"), "--fp8", "--fp8-backend", "torchao", "--fp8-strict"])
    assert "torchao" in p.stderr
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["precision"]["name"] == "fp8-torchao" and cfg["precision"]["fp8_layers"] == 4 * 7
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "fp8")
    assert a[30] < a[1] - 1.0                               # it trains
    assert abs(b[30] - a[30]) / a[30] < 0.05                # FP8 ends within 5% of fp32
    assert b != a                                           # and really ran a different (FP8) path
    from model import load
    load(tmp_path / "fp8")                                  # an FP8-trained model loads as a plain GPT


def test_ddp_two_processes_on_cpu(tmp_path, data_dir):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           SCRIPT, *FAST, "--data", str(data_dir), "--out", str(out), "--max-steps", "4"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "DDP: 2 processes, backend gloo" in p.stderr
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]        # one writer: rank 0
    assert recs[0]["tokens"] == 2 * 4 * 64                  # both ranks' targets counted
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2


def test_default_job_without_arguments_prepares_the_embedded_corpus(tmp_path, monkeypatch):
    """The no-argument path, on a 12-file slice of the stdlib so it stays fast."""
    import functools
    import data.build
    import data
    import train.pretrain as tp
    from train.options import TrainOptions
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "prepare", functools.partial(data.build.prepare, max_files=12, progress=False))
    opts = TrainOptions(max_steps=3, batch_size=2, seq_len=32)   # everything else: the defaults
    summary = tp.run(opts)
    assert (tmp_path / "runs" / "data" / "stdlib-bpe4096" / "manifest.json").is_file()
    run_dir = tmp_path / "runs" / "tiny-stdlib-bpe4096"
    assert summary["steps"] == 3 and Path(summary["checkpoint"]).resolve().parent.parent == run_dir
    assert "val_loss" in summary and (run_dir / "loss.png").is_file()
    from model import load
    assert load(run_dir).config.n_layer == 4                         # the tiny preset
    tp.run(TrainOptions(max_steps=1, batch_size=2, seq_len=32))      # a second default run: a new folder
    assert (tmp_path / "runs" / "tiny-stdlib-bpe4096-2" / "checkpoints").is_dir()


def test_ctrl_c_saves_and_exits_cleanly(tmp_path, data_dir):
    import signal
    import time
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, SCRIPT, *FAST, "--data", str(data_dir), "--out", str(out),
                             "--max-steps", "100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    while time.time() < deadline and len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]                    # interrupted, not finished (README: exit codes)
    assert "Traceback" not in err
    last = max(losses(out))
    assert (out / "checkpoints" / f"step_{last:08d}" / "trainer_state.json").is_file()   # saved at the last step


def test_init_with_rope_scaling_extends_context(tmp_path, data_dir):
    run([*FAST, "--data", str(data_dir), "--out", str(tmp_path / "base"), "--max-steps", "2"])
    run(["--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "long"), "--max-steps", "1",
         "--batch-size", "1", "--seq-len", "700", "--init", str(tmp_path / "base"),
         "--rope-scaling", "yarn", "--rope-factor", "2", "--eval-tokens", "700"])
    from model import load
    cfg = load(tmp_path / "long").config
    assert (cfg.max_seq_len, cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_seq_len) == (1024, "yarn", 2.0, 512)


def test_wandb_offline_resumes_the_same_run(tmp_path, data_dir):
    from train.checkpoint import load_trainer_state
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    common = [*FAST, "--data", str(data_dir), "--out", str(tmp_path / "r"), "--wandb", "--save-every", "2"]
    run([*common, "--max-steps", "2"], env=env)
    first = load_trainer_state(tmp_path / "r" / "checkpoints" / "step_00000002")
    run([*common, "--max-steps", "3", "--resume"], env=env)
    second = load_trainer_state(tmp_path / "r" / "checkpoints" / "step_00000003")
    run_id = first["extra"]["wandb_id"]
    assert run_id and second["extra"]["wandb_id"] == run_id
    runs = sorted(p.name for p in (tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs)


def test_llmc_folder_without_tokenizer_trains_with_the_preset_vocab(tmp_path):
    """An llm.c / modded-nanogpt folder (shards only, no tokenizer.json: vocab_size unknown) trains with the
    preset's vocabulary (it used to raise TypeError comparing None with an int)."""
    from data import write_shard
    from model import load
    d = tmp_path / "fineweb"
    d.mkdir()
    ids = torch.randint(0, 4096, (6000,), generator=torch.Generator().manual_seed(0))
    write_shard(d / "fineweb_train_000001.bin", ids)
    write_shard(d / "fineweb_val_000000.bin", ids[:1500])
    p = run([*FAST, "--data", str(d), "--out", str(tmp_path / "r"), "--max-steps", "2"])
    assert "has no tokenizer.json: using preset tiny's vocab 4096" in p.stderr
    assert load(tmp_path / "r").config.vocab_size == 4096


def test_kernels_choice_is_not_saved_so_a_triton_run_opens_on_cpu(tmp_path, data_dir):
    """--kernels is a choice of the training process: the checkpoint does not record it, and infer/chat.py
    (without Triton's interpreter) answers from a model trained with --kernels triton."""
    out = tmp_path / "r"
    run(["--preset", "tiny", "--batch-size", "1", "--seq-len", "16", "--eval-tokens", "16", "--data", str(data_dir),
         "--out", str(out), "--max-steps", "1", "--kernels", "triton"], env={"TRITON_INTERPRET": "1"})
    ck = out / "checkpoints" / "step_00000001"
    assert "kernels" not in json.loads((ck / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["train"]["kernels"] == "triton"   # the run record keeps it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    c = subprocess.run([sys.executable, str(ROOT / "infer" / "chat.py"), "--ckpt", str(out), "--complete",
                        "--prompt", "def", "--max-new-tokens", "3", "--compile", "off"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert c.returncode == 0, c.stderr
