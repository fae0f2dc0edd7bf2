"""bench/generate.py runs end to end with its llama.cpp rows (speed is never asserted: numbers are bench/'s)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generate_bench_rows_with_llama_cpp():
    r = subprocess.run([sys.executable, str(ROOT / "bench/generate.py"), "--presets", "tiny", "--dtypes", "int8",
                        "--compile", "off", "--hf-dtypes", "", "--llama-types", "q8_0,f16", "--new-tokens", "4",
                        "--repeats", "1", "--prompt-len", "16", "--threads", "1"],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {(x["impl"], x["dtype"]): x for x in json.loads(r.stdout.strip().splitlines()[-1])["rows"]}
    assert set(rows) == {("furnace", "int8"), ("llama.cpp", "q8_0"), ("llama.cpp", "f16")}
    for x in rows.values():
        assert x["decode_tok_s"] > 0 and x["ttft_ms"] > 0 and len(x["decode_tok_s_runs"]) == 1
    # bytes read per token: Q8_0 stores 34 bytes per 32 weights, ours 1 byte per weight + an fp32 scale per row
    ours, q8, f16 = rows["furnace", "int8"]["weight_MB"], rows["llama.cpp", "q8_0"]["weight_MB"], rows["llama.cpp", "f16"]["weight_MB"]
    assert abs(q8 / ours - 34 / 32) < 0.02 and abs(f16 / q8 - 64 / 34) < 0.01
