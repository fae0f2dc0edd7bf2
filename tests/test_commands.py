"""Every documented command runs as a file and as a module; the training and inference commands answer
--help without importing torch (heavy imports live inside main)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["train/pretrain.py", "sft/train_sft.py", "sft/train_dpo.py", "infer/chat.py", "infer/export_hf.py",
            "infer/evaluate.py", "sft/merge_lora.py", "sft/train_distill.py", "sft/train_grpo.py", "bench/throughput.py",
            "data/prepare.py"]
LIGHT = COMMANDS[:9]


@pytest.mark.parametrize("path", COMMANDS)
def test_command_runs_as_file_and_as_module(path, tmp_path):
    as_file = subprocess.run([sys.executable, str(ROOT / path), "--help"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    module = path[:-3].replace("/", ".")
    as_module = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                               timeout=120)
    assert as_file.returncode == 0 and as_file.stdout.startswith("usage:"), as_file.stderr
    assert as_module.returncode == 0 and as_module.stdout == as_file.stdout, as_module.stderr


@pytest.mark.parametrize("path", LIGHT)
def test_help_does_not_import_torch(path):
    code = ("import runpy, sys; sys.argv = ['x', '--help']\n"
            "try:\n    runpy.run_module(sys.argv_module, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)").replace("sys.argv_module", repr(path[:-3].replace("/", ".")))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.stderr.strip().splitlines()[-1] == "False", p.stderr
