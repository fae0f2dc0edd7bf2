"""bench/generate.py runs end to end with its llama.cpp rows (speed is never asserted: numbers are bench/'s)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generate_bench_rows_with_llama_cpp():
    # --vs-llama sets int8, 1 thread, no transformers rows; the flags given here win over its compile/types/repeats.
    r = subprocess.run([sys.executable, str(ROOT / "bench/generate.py"), "--vs-llama", "--presets", "tiny",
                        "--compile", "off", "--llama-types", "q8_0,f16", "--new-tokens", "4", "--repeats", "2",
                        "--prompt-len", "16"],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["conditions"]["threads"] == 1 and doc["repeats"] == 2
    rows = {(x["impl"], x["dtype"]): x for x in doc["rows"]}
    assert set(rows) == {("furnace", "int8"), ("llama.cpp", "q8_0"), ("llama.cpp", "f16")}
    for x in rows.values():
        assert x["decode_tok_s"] > 0 and x["ttft_ms"] > 0 and len(x["decode_tok_s_runs"]) == 2
    # bytes read per token: Q8_0 stores 34 bytes per 32 weights, ours 1 byte per weight + an fp32 scale per row
    ours, q8, f16 = rows["furnace", "int8"]["weight_MB"], rows["llama.cpp", "q8_0"]["weight_MB"], rows["llama.cpp", "f16"]["weight_MB"]
    assert abs(q8 / ours - 34 / 32) < 0.02 and abs(f16 / q8 - 64 / 34) < 0.01
    # ratios ours / llama.cpp, taken round by round from the same runs
    for ratio in doc["ratios"]:
        a, b = rows["furnace", "int8"], rows["llama.cpp", ratio["llama"]]
        assert ratio["decode_ratio_runs"] == [x / y for x, y in zip(a["decode_tok_s_runs"], b["decode_tok_s_runs"])]
        assert min(ratio["ttft_ratio_range"]) == pytest.approx(min(x / y for x, y in zip(a["ttft_ms_runs"],
                                                                                      b["ttft_ms_runs"])))
    assert sorted(x["llama"] for x in doc["ratios"]) == ["f16", "q8_0"]
