"""What the benchmark commands share (a library module, not a command): one measurement in a fresh worker
process, and the end of a report."""
import json
import os
import subprocess
import sys


def run_worker(argv: list[str], label: str, timeout: float | None = None) -> tuple[dict | None, str]:
    """Run `python ARGV` (a bench's own worker mode) in a fresh process, so peak-memory figures are clean and a
    crash or OOM takes down only this row. TRITON_INTERPRET is dropped (compiled Triton on a GPU); the worker's
    stderr is passed on, each line prefixed with [label]. Returns (the JSON document on its last stdout line, '')
    or (None, why there is none)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"did not finish within {timeout} s"
    for line in out.stderr.splitlines():
        print(f"  [{label}] {line}", file=sys.stderr)
    lines = out.stdout.strip().splitlines()
    if out.returncode == 0 and lines:
        try:
            return json.loads(lines[-1]), ""
        except json.JSONDecodeError:
            pass
    tail = [ln for ln in out.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return None, f"worker exited with code {out.returncode}: {tail[0][:300]}"


def finish_report(report: dict, json_path=None) -> None:
    """Write the report to json_path (when given) through the one atomic write; print it as the last stdout line."""
    if json_path:
        from model.fileio import atomic_write_json  # noqa: PLC0415
        atomic_write_json(json_path, report)
    print(json.dumps(report))
