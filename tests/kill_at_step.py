"""Run a training command and kill it with SIGKILL, as `kill -9` would, once optimizer step N is done (its
metrics line, evaluation and checkpoint written) and before step N + 1 starts. The tests' own signal: the
training loop knows nothing of it.

    python tests/kill_at_step.py N train/pretrain.py ARGS...
"""
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.trainer import Trainer  # noqa: E402

kill_at, script = int(sys.argv[1]), sys.argv[2]
sys.argv = sys.argv[2:]
train_step = Trainer.train_step


def train_step_or_die(self):
    if self.state.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return train_step(self)


Trainer.train_step = train_step_or_die
runpy.run_path(str(ROOT / script) if not Path(script).is_absolute() else script, run_name="__main__")
