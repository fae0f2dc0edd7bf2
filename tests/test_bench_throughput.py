"""bench/throughput.py: the JSON contract, unavailable rows with reasons and no numbers, and the pieces
(prechecks, speed-ups, table, plot) on their own. Tiny shapes; no timing asserts."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.throughput import NUMBERS, add_speedups, format_table, measure, precheck, write_plot
from model.config import get_preset
from kernels.common import FurnaceError
from model.flops import flops_per_token

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "throughput.py"
CPU = torch.device("cpu")


def _run(args, tmp_path):
    # One thread and passive OpenMP waits: the test machine is shared; neither changes what is asserted.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = _run(["--device", "cpu", "--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "2",
                "--warmup", "1", "--variants", "eager,triton,liger", "--precisions", "bf16,fp8-te",
                "--json", str(tmp / "r.json"), "--plot", str(tmp / "r.png")], tmp)
    assert out.returncode == 0, out.stderr[-2000:]
    return out, tmp


def test_last_stdout_line_is_the_json_report(report):
    out, tmp = report
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc == json.loads((tmp / "r.json").read_text())
    assert {"device", "versions", "git_commit", "config", "results"} <= set(doc)
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["config"]["flops_per_token"] == flops_per_token(get_preset("tiny"), 16)
    assert doc["config"]["tokens_per_step"] == 32
    assert [(r["variant"], r["precision"]) for r in doc["results"]] == [
        (v, p) for v in ("eager", "triton", "liger") for p in ("bf16", "fp8-te")]
    assert "unavailable" in out.stdout and "variant" in out.stdout       # the console table came first
    assert (tmp / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unavailable_rows_carry_reasons_and_no_numbers(report):
    rows = json.loads(report[0].stdout.strip().splitlines()[-1])["results"]
    by = {(r["variant"], r["precision"]): r for r in rows}
    for key in [("eager", "fp8-te"), ("triton", "bf16"), ("triton", "fp8-te"), ("liger", "bf16")]:
        r = by[key]
        assert r["status"] == "unavailable", key
        assert r["reason"], key
        assert all(r[k] is None for k in NUMBERS), key
    assert "TransformerEngine" in by[("eager", "fp8-te")]["reason"]
    assert "CUDA" in by[("triton", "bf16")]["reason"]


def _check_ok_row(r, tokens):
    assert r["status"] == "ok" and r["reason"] is None
    assert r["tokens_per_step"] == tokens
    assert r["tokens_per_s"] == pytest.approx(tokens / (r["step_ms_median"] / 1e3), rel=1e-9)
    assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
    assert r["mfu"] is None and "CPU" in r["mfu_note"]                   # no CPU peak: no MFU
    assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] > 0
    assert r["peak_mem_kind"].startswith("CPU")
    assert r["loss_first"] == pytest.approx(math.log(get_preset("tiny").vocab_size), abs=0.5)  # ~ln(V) at init


def test_ok_row_is_consistent(report):
    rows = json.loads(report[0].stdout.strip().splitlines()[-1])["results"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert [(r["variant"], r["precision"]) for r in ok] == [("eager", "bf16")]   # all this CPU can run of them
    _check_ok_row(ok[0], 32)
    assert ok[0]["speedup_vs_eager_bf16"] == 1.0
    assert ok[0]["ran_as"] == "bf16 autocast on CPU"


def test_fp8_torchao_runs_on_cpu(one_thread):
    r = measure(dict(variant="eager", precision="fp8-torchao", preset="tiny", batch_size=1, seq_len=16,
                     warmup=1, steps=2, device="cpu"))
    _check_ok_row(r, 16)
    n_linear = 7 * get_preset("tiny").n_layer                          # q, k, v, o, gate, up, down per block
    assert "torchao" in r["ran_as"] and f"{n_linear} block Linear layers" in r["ran_as"]


@pytest.mark.parametrize("args,flag", [
    (["--variants", "eager,bogus"], "--variants"),
    (["--precisions", "fp4"], "--precisions"),
    (["--seq-len", "100000"], "--seq-len"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--json", "/nonexistent-dir/r.json"], "--json"),
])
def test_bad_input_is_refused_before_measuring(args, flag, monkeypatch):
    from bench import throughput                                       # noqa: PLC0415
    monkeypatch.setattr(throughput, "run_rows", lambda *a: pytest.fail("measured despite bad input"))
    with pytest.raises(FurnaceError, match=flag):
        throughput.main(["--device", "cpu", "--preset", "tiny", *args])


def test_cli_error_is_one_line(tmp_path):
    out = _run(["--device", "cpu", "--variants", "eager,bogus"], tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --variants"), out.stderr


def test_precheck_on_cpu():
    assert precheck("eager", "bf16", CPU) == ""
    assert precheck("eager", "fp8-torchao", CPU) == ""
    assert "CUDA" in precheck("triton", "bf16", CPU)
    assert "liger" in precheck("liger", "bf16", CPU)
    assert "TransformerEngine" in precheck("eager", "fp8-te", CPU)


def test_measure_reports_user_errors_as_unavailable():
    row = measure(dict(variant="eager", precision="bf16", preset="tiny", batch_size=1, seq_len=10_000,
                       warmup=0, steps=1, device="cpu"))
    assert row["status"] == "unavailable" and "--seq-len 10000" in row["reason"]
    assert "tokens_per_s" not in row


def _row(variant, precision, status="ok", tps=None):
    r = {"variant": variant, "precision": precision, "status": status, "reason": None if status == "ok" else "x"}
    r.update({k: None for k in NUMBERS})
    if tps is not None:
        r.update(tokens_per_s=tps, tokens_per_step=tps, step_ms_median=1e3, step_ms_min=900.0, step_ms_max=1100.0,
                 spread_pct=20.0)
    return r


def test_speedups_only_against_a_measured_eager_bf16():
    rows = [_row("eager", "bf16", tps=100.0), _row("compile", "bf16", tps=250.0), _row("triton", "bf16", "unavailable")]
    add_speedups(rows)
    assert [r["speedup_vs_eager_bf16"] for r in rows] == [1.0, 2.5, None]
    rows = [_row("eager", "bf16", "error"), _row("compile", "bf16", tps=250.0)]
    add_speedups(rows)
    assert rows[1]["speedup_vs_eager_bf16"] is None


def test_table_and_plot_render_unavailable_rows(tmp_path):
    rows = [_row("eager", "bf16", tps=1234.0), _row("triton", "bf16", "unavailable")]
    add_speedups(rows)
    rep = {"device": "cpu (test)", "config": {"preset": "tiny", "batch_size": 1, "seq_len": 8, "warmup_steps": 0,
                                              "timed_steps": 1}, "results": rows}
    table = format_table(rep)
    assert "1,234" in table and "1.00x" in table
    triton_line = next(ln for ln in table.splitlines() if ln.startswith("triton"))
    assert triton_line.split()[2] == "unavailable" and set(triton_line.split()[3:]) == {"-"}   # no numbers
    write_plot(tmp_path / "p.png", rep)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
