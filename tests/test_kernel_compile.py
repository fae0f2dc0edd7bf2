"""bench/kernel_compile.py: every Triton kernel compiled ahead of time for CUDA targets with no GPU, with the
launch configurations the launchers choose, and checked against the targets' limits; and the check can fail."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernel_compile import LIMITS, judge  # noqa: E402
from kernels.launch import GPUS  # noqa: E402
from kernels.rms_norm import rms_norm_bwd_config, rms_norm_fwd_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel",
           "_swiglu_bwd_kernel", "_cross_entropy_fwd_kernel"}


def _check(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_compile.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_reduced_set_compiles_within_limits():
    """tiny's shapes, bf16, one row count, for A100 and RTX 5090 (ptxas and ptxas-blackwell)."""
    out = _check("--presets", "tiny", "--targets", "sm_80,sm_120", "--dtypes", "bf16", "--rows", "4096")
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["failed"] == 0 and rep["compiles"] == len(rep["results"])
    for t in ("sm_80", "sm_120"):
        assert {r["kernel"] for r in rep["results"] if r["target"] == t} == KERNELS
    for r in rep["results"]:
        assert r["ok"] and r["regs"] > 0 and r["local"] == 0 and r["blocks_per_sm"] >= 1, r
    # the configurations compiled are the launchers' own (tiny: d_model 256, head_dim 64; 4096 rows)
    for N in (256, 64):
        for fn, name in ((rms_norm_fwd_config, "_rms_norm_fwd_kernel"), (rms_norm_bwd_config, "_rms_norm_bwd_kernel")):
            launch = fn(4096, N, GPUS["sm_80"])
            want = " ".join(f"{k}={v}" for k, v in launch.constexprs.items()) + f" num_warps={launch.num_warps}"
            assert any(r["kernel"] == name and r["config"].startswith(want) for r in rep["results"]), want


def test_oversized_config_fails_with_one_line():
    """An 8192-wide fp32 row in one warp (256 values per thread) cannot live in registers: the check must name
    the kernel, the configuration, the target and the broken limit, and exit non-zero without a traceback."""
    out = _check("--config", "_rms_norm_fwd_kernel:BLOCK_M=1,BLOCK_N=8192,num_warps=1", "--presets", "tiny",
                 "--targets", "sm_90", "--dtypes", "fp32", "--rows", "4096")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1, out.stderr
    for part in ("_rms_norm_fwd_kernel", "BLOCK_M=1 BLOCK_N=8192 num_warps=1", "sm_90", "local memory"):
        assert part in line[0], line[0]
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["failed"] == 1 and rep["results"][0]["local"] > 0


@pytest.mark.parametrize("arch", sorted(LIMITS))
def test_each_limit_can_fail(arch):
    lim = LIMITS[arch]
    ok = judge(dict(regs=32, local=0, shared=16 * 1024), arch, 256)
    assert ok["ok"] and ok["blocks_per_sm"] >= 1
    assert not judge(dict(regs=32, local=8, shared=0), arch, 256)["ok"]                      # spills
    assert not judge(dict(regs=32, local=0, shared=lim["smem_block"] + 1), arch, 128)["ok"]  # shared memory
    bad = judge(dict(regs=128, local=0, shared=0), arch, 1024)                               # 131072 registers
    assert not bad["ok"] and "register file" in bad["failures"][0]
    assert not judge(dict(error="does not compile (x)"), arch, 128)["ok"]


def test_occupancy_arithmetic():
    """H100: 64 regs x 256 threads = 16K registers per block -> 4 blocks by registers; 48 KB of shared memory
    (+1 KB reserved) -> 4 blocks in 228 KB; RTX 4090: 1536 threads per SM -> 6 blocks of 256 threads."""
    assert judge(dict(regs=64, local=0, shared=48 * 1024), 90, 256)["blocks_per_sm"] == 4
    assert judge(dict(regs=16, local=0, shared=0), 89, 256)["blocks_per_sm"] == 6
    assert judge(dict(regs=16, local=0, shared=60 * 1024), 89, 128)["blocks_per_sm"] == 1
