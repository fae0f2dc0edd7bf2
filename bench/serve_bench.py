"""Serving speed of infer/serve.py: aggregate tokens/s and time to first token with 1, 4 and 16 concurrent
streaming clients (the same requests each time; 1 = one request at a time), then a load run of many requests
with random client disconnects that checks every completed answer is whole and no request is lost or doubled.

    python bench/serve_bench.py                      # 112m shape, random weights, fp32 (the server's default)
    python bench/serve_bench.py --dtype int8 --requests 16 --new-tokens 32 --load-requests 200

The model: the 112m preset's shape with random weights and the vocabulary of a BPE trained on the Python
standard library (~44k tokens, padded to a multiple of 64, as training does; the preset's 49152 needs a larger
corpus). The server runs as its own process (`infer/serve.py`, all cores); the clients are asyncio streams in
this process. Greedy decoding, so in fp32 every answer to the same prompt must be the same text (the check of
wholeness in the load run). The last stdout line is one JSON document with every number and the conditions.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import contextlib  # noqa: E402

from kernels.common import FurnaceError, run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serve_process(ckpt, extra_args, log_path: Path, timeout: float = 300):
    """Run `infer/serve.py --ckpt CKPT` on 127.0.0.1 and a free port until GET /health answers 200; yields the
    base URL; the process always stops (tests/test_serve_web.py uses this too)."""
    import socket
    import subprocess
    import time

    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "infer" / "serve.py"), "--ckpt", str(ckpt), "--port",
                                 str(port), *extra_args], stdout=log, stderr=subprocess.STDOUT, cwd="/")
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise FurnaceError(f"infer/serve.py did not start: {Path(log_path).read_text()[-500:]}")
                try:
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def build_checkpoint(out: Path, preset: str):
    import torch

    from data import train_bpe
    from data.chat_template import CHAT_TOKENS
    from data.sources import default_corpus_files
    from model import GPT, get_preset, save

    texts = [f.read_text(errors="replace") for f in default_corpus_files()]
    tok = train_bpe(texts, vocab_size=49152, special_tokens=list(CHAT_TOKENS))
    cfg = get_preset(preset)
    cfg.vocab_size = (tok.vocab_size + 63) // 64 * 64
    torch.manual_seed(0)
    model = GPT(cfg)
    save(model, out)
    tok.save(out)
    return {"preset": preset, "params": model.num_params(), "vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd}, texts


def prompts_from(texts, n: int, chars: int, seed: int) -> list[str]:
    import random
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        t = rng.choice(texts)
        if len(t) > chars + 1:
            i = rng.randrange(0, len(t) - chars)
            out.append(t[i:i + chars])
    return out


async def stream_one(client, url: str, body: dict, drop_after: int | None = None) -> dict:
    """One streaming completion: ttft (first text), text, finish, usage, ids seen, whether [DONE] came."""
    import json
    import time
    t0 = time.perf_counter()
    r = {"ttft": None, "text": "", "finish": None, "usage": None, "ids": set(), "done": False, "dropped": False}
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            r["status"] = resp.status_code
            r["error"] = (await resp.aread()).decode()[:200]
            return r
        n = 0
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                r["done"] = True
                break
            ev = json.loads(line[6:])
            r["ids"].add(ev.get("id"))
            if ev.get("usage"):
                r["usage"] = ev["usage"]
            for ch in ev.get("choices", []):
                if ch.get("text"):
                    if r["ttft"] is None:
                        r["ttft"] = time.perf_counter() - t0
                    r["text"] += ch["text"]
                if ch.get("finish_reason"):
                    r["finish"] = ch["finish_reason"]
            n += 1
            if drop_after is not None and n >= drop_after:
                r["dropped"] = True
                break        # leaving the block closes the connection mid-answer
    r["wall"] = time.perf_counter() - t0
    return r


async def run_level(url: str, prompts: list[str], concurrency: int, new_tokens: int) -> dict:
    import asyncio
    import time

    import httpx
    sem = asyncio.Semaphore(concurrency)
    body = {"model": "bench", "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}

    async with httpx.AsyncClient(timeout=600) as client:
        async def one(p):
            async with sem:
                return await stream_one(client, url, {**body, "prompt": p})
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    bad = [r for r in res if not r["done"] or r["usage"] is None]
    if bad:
        raise FurnaceError(f"serve_bench: {len(bad)} request(s) at concurrency {concurrency} did not complete: "
                           f"{bad[0].get('error', bad[0])}")
    toks = sum(r["usage"]["completion_tokens"] for r in res)
    ttft = sorted(r["ttft"] for r in res if r["ttft"] is not None)
    return {"concurrency": concurrency, "requests": len(res), "completion_tokens": toks, "wall_s": round(wall, 3),
            "tokens_per_s": round(toks / wall, 2), "ttft_p50_s": round(_pct(ttft, 50), 3),
            "ttft_p95_s": round(_pct(ttft, 95), 3), "texts": [r["text"] for r in res]}


def _pct(xs, q):
    import math
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


async def load_run(url: str, prompts: list[str], n: int, concurrency: int, p_drop: float, seed: int,
                   exact: bool) -> dict:
    """n requests (greedy, a few prompts x lengths), at most `concurrency` in flight, a fraction dropped by the
    client after a few events. Checks: each completed stream is whole (its [DONE], a finish_reason, usage equal
    to max_tokens unless it stopped, and in fp32 the same text as every other answer to the same request) and
    every response id is distinct (none lost, none doubled)."""
    import asyncio
    import random
    import time

    import httpx
    rng = random.Random(seed)
    plan = [(rng.randrange(len(prompts)), rng.choice((8, 16, 24)), rng.randint(1, 6) if rng.random() < p_drop else None)
            for _ in range(n)]
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i, tokens, drop):
            async with sem:
                body = {"model": "bench", "prompt": prompts[i], "max_tokens": tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}}
                return await stream_one(client, url, body, drop)
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(*p) for p in plan))
        wall = time.perf_counter() - t0
    problems, texts = [], {}
    ids = [i for r in res for i in r["ids"]]
    if len(ids) != len(set(ids)) or any(len(r["ids"]) > 1 for r in res):
        problems.append("a response id was repeated or changed within a stream")
    completed = [(p, r) for p, r in zip(plan, res) if not r["dropped"]]
    for (i, tokens, _), r in completed:
        if not r["done"] or r["finish"] is None or r["usage"] is None:
            problems.append(f"request for prompt {i} ({tokens} tokens) ended without finish/usage/[DONE]")
            continue
        if r["finish"] == "length" and r["usage"]["completion_tokens"] != tokens:
            problems.append(f"finish 'length' after {r['usage']['completion_tokens']} tokens, asked {tokens}")
        if exact:
            if texts.setdefault((i, tokens), r["text"]) != r["text"]:
                problems.append(f"prompt {i} x {tokens} tokens: answers differ between requests")
    if sum(1 for r in res if r["dropped"]) + len(completed) != n:
        problems.append("requests lost")
    return {"requests": n, "completed": len(completed), "dropped_by_client": n - len(completed),
            "concurrency": concurrency, "wall_s": round(wall, 2),
            "completion_tokens": sum(r["usage"]["completion_tokens"] for _, r in completed if r["usage"]),
            "distinct_answers_checked": len(texts), "problems": problems[:10], "ok": not problems}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="112m", help="model preset served (random weights); default: 112m")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"], help="weight precision; default: fp32")
    p.add_argument("--levels", default="1,4,16", help="concurrent clients per level (1 = one request at a time); default: 1,4,16")
    p.add_argument("--requests", type=int, default=16, help="requests per level (the same ones at every level); default: 16")
    p.add_argument("--prompt-chars", type=int, default=240, help="prompt length in characters (~60-80 tokens); default: 240")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request; default: 32")
    p.add_argument("--load-requests", type=int, default=200, help="requests in the load run; default: 200")
    p.add_argument("--load-concurrency", type=int, default=16, help="concurrent clients in the load run; default: 16")
    p.add_argument("--drop", type=float, default=0.25, help="fraction of load-run clients that leave mid-answer; default: 0.25")
    p.add_argument("--threads", type=int, default=None, help="server threads (default: physical cores)")
    p.add_argument("--json", default=None, help="also write the JSON document here; default: none")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x]
    if not levels or min(levels) < 1 or args.requests < 1 or args.load_requests < 0:
        raise FurnaceError("--levels, --requests: expected positive integers")

    import asyncio
    import json
    import os
    import tempfile
    import time

    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)   # not one line per request
    tmp = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    ckpt = tmp / "bench"
    t0 = time.perf_counter()
    model_info, texts = build_checkpoint(ckpt, args.preset)
    print(f"model {model_info} built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    extra = ["--dtype", args.dtype, "--max-slots", str(max(levels + [args.load_concurrency])), "--max-queue", "1024"]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    from train.metrics import run_record
    record = run_record("cpu")
    load_before = os.getloadavg()
    with serve_process(ckpt, extra, tmp / "serve.log") as url:
        prompts = prompts_from(texts, args.requests, args.prompt_chars, seed=1)
        asyncio.run(run_level(url, prompts[:2], 2, 4))                          # warm-up (allocator, threads)
        rows = []
        for c in levels:
            h0 = httpx.get(url + "/health", timeout=5).json()
            row = asyncio.run(run_level(url, prompts, c, args.new_tokens))
            h1 = httpx.get(url + "/health", timeout=5).json()
            steps = h1["decode_steps"] - h0["decode_steps"]
            row["mean_decode_batch"] = round((h1["decode_rows"] - h0["decode_rows"]) / max(1, steps), 2)
            print(f"concurrency {c:>2}: {row['tokens_per_s']:7.1f} tok/s, TTFT p50 {row['ttft_p50_s']:.2f} s "
                  f"p95 {row['ttft_p95_s']:.2f} s, {row['wall_s']:.1f} s", file=sys.stderr)
            rows.append(row)
        same = all(r["texts"] == rows[0]["texts"] for r in rows)
        for r in rows:
            del r["texts"]
        load = None
        if args.load_requests:
            load = asyncio.run(load_run(url, prompts_from(texts, 8, args.prompt_chars, seed=2), args.load_requests,
                                        args.load_concurrency, args.drop, seed=3, exact=args.dtype == "fp32"))
            print(f"load: {load}", file=sys.stderr)
            deadline = time.monotonic() + 30
            while (h := httpx.get(url + "/health", timeout=5).json())["active"] or h["waiting"]:
                if time.monotonic() > deadline:
                    load["ok"], load["problems"] = False, load["problems"] + [f"server still busy after the run: {h}"]
                    break
                time.sleep(0.1)
    load_after = os.getloadavg()
    base = rows[0]["tokens_per_s"] if rows[0]["concurrency"] == 1 else None
    for r in rows:
        r["speedup_vs_one_at_a_time"] = round(r["tokens_per_s"] / base, 2) if base else None
    doc = {"bench": "serve", **record, "server_threads": args.threads or "physical cores", "dtype": args.dtype,
           "model": model_info,
           "prompt_chars": args.prompt_chars, "new_tokens": args.new_tokens, "requests_per_level": args.requests,
           "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in load_after],
           "greedy_answers_equal_across_levels": same, "levels": rows, "load_run": load}
    if args.json:
        from model.fileio import atomic_write_json  # the one atomic write
        atomic_write_json(args.json, doc, indent=1)
    print(json.dumps(doc))
    if load is not None and not load["ok"]:
        return 1


if __name__ == "__main__":
    run_cli(main)
