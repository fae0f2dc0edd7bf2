"""What a newcomer runs first costs what a small machine has: kernel_bench's defaults, measured."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_bench_default_peak_memory_is_under_2_gb():
    """No arguments on a CPU: the process and its largest child together (an upper bound on the machine's
    peak: the memory children run one at a time) stay under 2 GB, measured by the kernel's own rusage."""
    p = subprocess.run([sys.executable, str(ROOT / "bench/kernel_bench.py")], capture_output=True, text=True,
                       timeout=600, env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    peak = report["peak_rss_mib"]
    assert peak["largest_child"] > 200                     # the materialised-logits child really ran
    assert peak["self"] + peak["largest_child"] < 2048, peak
    mem = report["memory"]
    assert mem["fused_mib"] < mem["materialised_mib"] and abs(mem["fused_loss"] - mem["materialised_loss"]) < 1e-3
    assert "--memory-shape 8192,768,49152" in subprocess.run(
        [sys.executable, str(ROOT / "bench/kernel_bench.py"), "--help"], capture_output=True, text=True).stdout
