"""What the benchmark commands share (a library module, not a command): one measurement in a fresh worker
process, the end of a report, and a process's memory as Linux counts it."""
import json
import os
import resource
import subprocess
import sys


def rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's own peak resident set (VmHWM). Not ru_maxrss: Linux carries the high-water mark of the image
    a process was exec'd from (a fork, or a vfork sharing the parent's memory) into it, so a worker started by a
    large parent (a pytest run, a benchmark holding a model) would report the parent's peak as its own."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) * 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


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
