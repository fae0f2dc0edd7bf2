"""bench/gpu_check.py --dry-run: the GPU check's whole control flow on CPU (tiny shapes, the interpreter), so
the command a GPU machine runs first cannot rot."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_dry_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "gc"
    r = _gpu_check("--out", str(out), "--dry-run")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    st = {s["name"]: s for s in rep["stages"]}
    assert list(st) == ["kernel_tests", "kernel_bench", "throughput_112m", "throughput_0.5b",
                        "pretrain_bf16_vs_fp8", "decode_112m"]
    for s in st.values():
        assert s["status"] in ("ok", "skipped"), s
        assert s["status"] == "ok" or s["reason"], s          # a skip always says why
        for log in [s.get("log")] + [run["log"] for run in s.get("runs", {}).values()]:
            assert log is None or (out / log).is_file(), log       # every stage's output is kept
    assert st["kernel_tests"]["counts"]["passed"] > 0 and not st["kernel_tests"]["failures"]
    assert st["kernel_bench"]["report"]["memory"]["fused_mib"] > 0
    assert [row["status"] for row in st["throughput_112m"]["rows"]] == ["ok"]
    pre = st["pretrain_bf16_vs_fp8"]
    assert len(pre["losses"]["bf16"]) == len(pre["losses"]["fp8"]) == 6 and pre["rel_diff"] <= 0.03
    assert rep["environment"]["dry_run"] and rep["environment"]["versions"]["torch"]
    md = (out / "gpu_check.md").read_text()
    assert "dry run" in md and "| pretrain_bf16_vs_fp8 | ok |" in md
    assert json.loads(r.stdout.strip().splitlines()[-1])["stages"]["kernel_tests"] == "ok"


def test_refuses_a_used_folder_and_unknown_stage(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = _gpu_check("--out", str(tmp_path), "--dry-run", timeout=120)
    assert r.returncode == 2 and "not an empty folder" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1
    r = _gpu_check("--out", str(tmp_path / "new"), "--stages", "kernel_tests,warp_drive", timeout=120)
    assert r.returncode == 2 and "warp_drive" in r.stderr and not (tmp_path / "new").exists()


def test_wheels_lists_offline_install():
    r = _gpu_check("--wheels", timeout=120)
    assert r.returncode == 0
    assert "pip download" in r.stdout and "torchao" in r.stdout and "--no-index --find-links" in r.stdout


def test_a_stage_past_its_budget_is_stopped_and_reported(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import _sh, _status  # noqa: PLC0415

    r = _sh([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 3, tmp_path / "s.log")
    assert r["rc"] is None and r["elapsed_s"] < 30 and "started" in (tmp_path / "s.log").read_text()
    assert _status(r, "sleeper")["status"] == "timeout"
