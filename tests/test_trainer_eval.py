"""Validation during training and the start-up cost estimate, against independent computations: the final
evaluation reads the whole --eval-tokens budget, in-run ones a spread-out part of it (never fewer than
EVAL_MIN_BATCHES batches), and the speed line follows the steady step time, evaluations included."""
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train.options import TrainOptions
from train.task import LMTask
from train.trainer import EVAL_MIN_BATCHES, Trainer, eval_batches

from test_first_hour import small_data  # noqa: F401  (the fixture; tests/ is on sys.path under pytest)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def val_windows(data_dir: Path, T: int) -> torch.Tensor:
    """(N, T + 1) validation windows read straight from the shards (llm.c format: a 256 x int32 header, then
    uint16 tokens), stride T, in file order, never across a shard: the loader's sequential order."""
    out = []
    for shard in sorted(data_dir.glob("val_*.bin")):
        header = np.fromfile(shard, dtype="<i4", count=256)
        assert header[0] == 20240520
        toks = np.fromfile(shard, dtype="<u2", offset=1024)
        assert len(toks) == header[2]
        n = (len(toks) - 1) // T
        out += [toks[i * T:i * T + T + 1].astype(np.int64) for i in range(n)]
    return torch.from_numpy(np.stack(out))


@torch.no_grad()
def reference_val_loss(model, windows: torch.Tensor, B: int, batches) -> float:
    """Mean cross-entropy (float64) over the given batch indices, each batch = B consecutive windows."""
    model.eval()
    losses = []
    for i in batches:
        w = windows[i * B:(i + 1) * B]
        logits, _ = model(w[:, :-1])                                            # (B, T, V)
        losses.append(torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), w[:, 1:].flatten(),
                                                        reduction="none"))
    return torch.cat(losses).mean().item()


def test_eval_budget_in_run_has_a_floor_and_the_final_reads_eval_tokens():
    cpu_default = TrainOptions(max_steps=300, batch_size=8, seq_len=256)   # the default job; its val split: 17 batches
    assert eval_batches(cpu_default, 8 * 256, 17) == (EVAL_MIN_BATCHES, 17)
    assert EVAL_MIN_BATCHES >= 4
    fixed = TrainOptions(max_steps=300, batch_size=8, seq_len=256, eval_every=10)
    assert eval_batches(fixed, 8 * 256, 17) == (17, 17)                     # --eval-every N: the whole budget
    long = TrainOptions(max_steps=100_000, batch_size=8, seq_len=256)
    assert eval_batches(long, 8 * 256, 1000) == (32, 32)                    # 65,536 tokens: within ~3% anyway
    small_split = TrainOptions(max_steps=300, batch_size=8, seq_len=256)
    assert eval_batches(small_split, 8 * 256, 3) == (3, 3)                  # never more than one pass


def test_in_run_evaluation_spreads_its_batches_and_the_final_reads_all(small_data):
    from data import TokenLoader
    from model import GPT
    from model.config import get_preset
    B, T = 4, 32
    val = TokenLoader([(str(small_data), 1.0)], B, T, split="val", mode="sequential")
    assert val.batches_per_epoch >= 10
    cfg = get_preset("tiny")
    cfg.vocab_size, cfg.kernels = 320, "torch"
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    task = LMTask(None, val, eval_batches=10)
    task.in_run_batches = 3
    windows = val_windows(small_data, T)
    with torch.no_grad():
        in_run, final = task.evaluate(model, final=False)["val_loss"], task.evaluate(model, final=True)["val_loss"]
    assert in_run == pytest.approx(reference_val_loss(model, windows, B, [0, 3, 6]), rel=1e-5)
    assert final == pytest.approx(reference_val_loss(model, windows, B, range(10)), rel=1e-5)


def test_a_run_with_the_automatic_cadence_ends_with_the_whole_budget(tmp_path, small_data):
    """The final val loss printed and saved is the loss over the first --eval-tokens of the validation split,
    recomputed here from the shards with the final checkpoint; in-run evaluations read fewer batches."""
    run = tmp_path / "run"
    B, T, n_final = 4, 32, 10
    p = subprocess.run([sys.executable, str(ROOT / "train/pretrain.py"), "--data", str(small_data), "--out", str(run),
                        "--max-steps", "16", "--batch-size", str(B), "--seq-len", str(T), "--eval-tokens",
                        str(n_final * B * T), "--sample-prompt", "none", "--lr", "3e-3"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    summary = json.loads((run / "summary.json").read_text())
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in evals if "val_loss" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 16 and evals[-1]["val_loss"] == pytest.approx(summary["val_loss"])
    from model import load
    model = load(run)
    ref = reference_val_loss(model, val_windows(small_data, T), B, range(n_final))
    assert summary["val_loss"] == pytest.approx(ref, rel=1e-4)
    assert f"val loss {summary['val_loss']:.4f}" in p.stderr


class SlowStartTask(LMTask):
    """The first `slow_steps` steps take `slow_s` longer (a test's stand-in for warm-up); each evaluation
    takes `eval_s`."""

    def __init__(self, loader, slow_steps=6, slow_s=0.4, eval_s=1.0):
        super().__init__(loader)
        self.calls, self.slow_steps, self.slow_s, self.eval_s = 0, slow_steps, slow_s, eval_s

    def loss(self, model, batch):
        self.calls += 1
        if self.calls <= self.slow_steps:
            time.sleep(self.slow_s)
        return super().loss(model, batch)

    def evaluate(self, model, final=True):
        time.sleep(self.eval_s)
        return {}


def seconds(d: str) -> int:
    m = re.fullmatch(r"(?:(\d+)m)?(\d+)s", d)
    return 60 * int(m.group(1) or 0) + int(m.group(2))


def test_speed_estimate_follows_the_steady_step_time_and_counts_evaluations(tmp_path, caplog):
    from model import GPT, GPTConfig
    from test_train_loop import CFG, ListLoader   # tests/ is on sys.path (pytest's rootdir insertion)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 61, (2, 16), generator=g), torch.randint(0, 61, (2, 16), generator=g))
    torch.manual_seed(0)
    opts = TrainOptions(max_steps=60, eval_every=20, log_every=1000, lr=1e-3)
    task = SlowStartTask(ListLoader([batch]))
    caplog.set_level(logging.INFO, logger="furnace")
    Trainer(opts, task, GPT(GPTConfig(**CFG)), run_dir=tmp_path).fit()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("speed:"))
    m = re.match(r"speed: ([\d.]+) s/step .*: about (\S+) for the (\d+) steps left and (\d+) evaluations", line)
    assert m, line
    s_per_step, left, steps_left, evals_left = float(m[1]), seconds(m[2]), int(m[3]), int(m[4])
    # timed: steps 4-11 (1-3 are the warm-up), so the estimate comes after step 11; left: the evaluations at
    # steps 20 and 40, and the final one
    assert (steps_left, evals_left) == (49, 3), line
    assert s_per_step < task.slow_s / 2, line          # the steady steps, not the slow first ones (old: 0.4)
    assert 3 * task.eval_s - 1 <= left <= 3 * task.eval_s + steps_left * s_per_step + 1, line
