"""CPU generation speed: time to first token and decode tokens/s for our generate (fp32, bf16, int8; eager and with
the compiled decode step) next to Hugging Face transformers' generate and llama.cpp (llama-cpp-python, Q8_0 and
F16 GGUF files written by infer/gguf_file.py) on the same random weights, with the memory-bandwidth bound: the
best matrix-vector GB/s measured in the run (fp32, bf16 and int8 kernels over a 256 MiB matrix) / weight bytes
read per token. Every row runs the same prompt, token count and threads; the rows run round-robin (one warm-up
round, then --repeats timed rounds) so drifting machine load hits them alike; medians and ranges are reported.

    python bench/generate.py                       # presets 26m and 112m, random weights
    python bench/generate.py --presets 26m --new-tokens 32 --repeats 2
    python bench/generate.py --vs-llama            # the decode target: ours int8 compiled vs llama.cpp Q8_0
With both an int8 row of ours and a llama.cpp row, the ratios ours / llama.cpp of decode tokens/s and of time to
first token are also taken round by round (one round = every row once, back to back), which is more robust on a
shared machine than the ratio of medians. The last stdout line is one JSON document with every number and the
conditions.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from kernels.common import FurnaceError, run_cli  # noqa: E402


def matvec_gbps(mode: str = "fp32", mib: int = 256, reps: int = 20) -> float:
    """Weight bytes per second streamed by one matrix-vector product over a `mib` MiB matrix (median): fp32 and
    bf16 through F.linear, int8 through our Int8Linear (this CPU's int8 kernel). Far larger than any cache."""
    import torch
    import torch.nn.functional as F

    from infer.quant import Int8Linear, huge_page_weights
    elem = {"fp32": 4, "bf16": 2, "int8": 1}[mode]
    n = int((mib * 2**20 / elem) ** 0.5)
    w = torch.randn(n, n)
    if mode == "int8":
        lin, x = Int8Linear(w), torch.randn(1, n)
        huge_page_weights(lin)  # where a quantized model's weights live
    else:
        dt = torch.float32 if mode == "fp32" else torch.bfloat16
        w, x = w.to(dt), torch.randn(1, n, dtype=dt)
        lin = functools.partial(F.linear, weight=w)
    ts = []
    with torch.inference_mode():
        for i in range(reps + 3):
            t = time.perf_counter()
            lin(x)
            if i >= 3:
                ts.append(time.perf_counter() - t)
    return n * n * elem / statistics.median(ts) / 1e9


# ---- one timed generation per engine: -> (time to first token s, decode tokens/s) ----------------------------
def _ours(decoder, prompt, n):
    from infer.generation import generate
    stamps = []
    t0 = time.perf_counter()
    generate(decoder.model, prompt, n, on_token=lambda _: stamps.append(time.perf_counter()), decoder=decoder)
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])


class _Stamps:
    """transformers streamer: records when each new token arrives (its first put() is the prompt)."""

    def __init__(self):
        self.t, self.first = [], True

    def put(self, value):
        if self.first:
            self.first = False
            return
        self.t.append(time.perf_counter())

    def end(self):
        pass


def _hf(model, prompt, n):
    import torch
    s = _Stamps()
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, streamer=s, pad_token_id=0, eos_token_id=None)
    return s.t[0] - t0, (len(s.t) - 1) / (s.t[-1] - s.t[0])


def _llama(llm, prompt, n):
    """Greedy through llama-cpp-python's eval (llama_decode) and an argmax over the last logits, as ours does."""
    import llama_cpp
    import numpy as np
    stamps = []
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    for _ in range(n):
        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        tok = int(np.argmax(last))
        stamps.append(time.perf_counter())
        if len(stamps) < n:
            llm.eval([tok])
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _llama_variants(base, preset, types, threads, n_ctx, tmp, gbps):
    """llama.cpp rows: the same weights written as GGUF files (infer/gguf_file.py) with a byte-level vocabulary."""
    import gguf
    from llama_cpp import Llama

    from data.tokenizer import train_bpe
    from infer.gguf_file import write_gguf
    tok = train_bpe(["the bench"] * 4, vocab_size=270)  # bytes, specials, a few merges; the rest is [PADi]
    out = []
    for t in types:
        path = write_gguf(base, tok, Path(tmp) / f"{preset}-{t}.gguf", t)
        mats = {x.name: int(x.n_bytes) for x in gguf.GGUFReader(str(path)).tensors if len(x.shape) > 1}
        wb = sum(mats.values())                              # norm vectors are not matmul weights
        if "output.weight" in mats:                          # untied: token_embd is only looked up
            wb -= mats["token_embd.weight"]
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                    verbose=False)
        out.append(({"impl": "llama.cpp", "preset": preset, "dtype": t, "weight_MB": wb / 1e6,
                     "bound_tok_s": gbps * 1e9 / wb}, _llama, llm))
    return out


def _round_ratios(measured) -> list[dict]:
    """[(row, [(ttft s, tok/s) per round])] -> for each int8 row of ours and each llama.cpp row of the preset, the
    ratios ours / llama.cpp of decode tokens/s (> 1: ours faster) and of TTFT (< 1: ours sooner), round by round."""
    out = []
    for ours, a in measured:
        if ours["impl"] == "llama.cpp" or ours["dtype"] != "int8":
            continue
        for llama, b in measured:
            if llama["impl"] != "llama.cpp":
                continue
            dec = [x[1] / y[1] for x, y in zip(a, b)]
            ttft = [x[0] / y[0] for x, y in zip(a, b)]
            out.append({"preset": ours["preset"], "ours": f"{ours['impl']} {ours['dtype']}", "llama": llama["dtype"],
                        "decode_ratio": statistics.median(dec), "decode_ratio_range": [min(dec), max(dec)],
                        "decode_ratio_runs": dec, "ttft_ratio": statistics.median(ttft),
                        "ttft_ratio_range": [min(ttft), max(ttft)]})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="26m,112m", help="comma-separated model presets (random weights); default: 26m,112m")
    p.add_argument("--dtypes", default="fp32,bf16,int8", help="our weight dtypes to time ('' = none); default: fp32,bf16,int8")
    p.add_argument("--hf-dtypes", default="fp32,bf16", help="transformers dtypes to compare ('' = skip); default: fp32,bf16")
    p.add_argument("--llama-types", default="q8_0,f16",
                   help="llama.cpp GGUF types to compare ('' = skip; skipped with a notice without llama-cpp-python); default: q8_0,f16")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (prefill); default: 128")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per run; default: 64")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (after one warm-up); default: 3")
    p.add_argument("--threads", type=int, default=None, help="CPU threads; default: physical cores")
    p.add_argument("--compile", default="both", choices=["both", "on", "off"],
                   help="our rows with the eager and/or the compiled decode step (infer.decode); default: both")
    p.add_argument("--vs-llama", action="store_true",
                   help="the decode target check: our int8 compiled step vs llama.cpp Q8_0, 1 thread, 6 timed rounds "
                        "(= --dtypes int8 --compile on --hf-dtypes '' --llama-types q8_0 --threads 1 --repeats 6; "
                        "flags given as well win)")
    if p.parse_known_args(argv)[0].vs_llama:
        p.set_defaults(dtypes="int8", compile="on", hf_dtypes="", llama_types="q8_0", threads=1, repeats=6)
    args = p.parse_args(argv)

    import copy
    import importlib.util
    import tempfile

    import torch

    from infer.decode import Decoder
    from infer.export_hf import export_hf
    from infer.quant import quantize, weight_bytes_per_token
    from infer.runtime import set_threads
    from model.config import get_preset
    from model.gpt import GPT

    threads = set_threads(args.threads)
    modes = [m for m in args.dtypes.split(",") if m]
    hf_modes = [m for m in args.hf_dtypes.split(",") if m]
    llama_types = [m for m in args.llama_types.split(",") if m]
    if args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1:
        raise FurnaceError("--prompt-len >= 1, --new-tokens >= 2 and --repeats >= 1 are required")
    if llama_types and importlib.util.find_spec("llama_cpp") is None:
        print("# llama.cpp rows skipped: llama-cpp-python is not installed (pip install llama-cpp-python)")
        llama_types = []
    compile_choices = {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]
    from train.metrics import run_record
    cond = {**run_record("cpu", ("transformers", "llama-cpp-python")), "threads": threads}
    # The bound uses the best streaming rate measured on this machine, whichever kernel reached it.
    per_mode = {m: matvec_gbps(m) for m in ("fp32", "bf16", "int8")}
    gbps = max(per_mode.values())
    cond.update({f"matvec_{m}_GBps": v for m, v in per_mode.items()})
    cond["bound_GBps"] = gbps
    v = cond["versions"]
    print(f"# {cond['cpu']}, {threads} threads, torch {v['torch']}, transformers {v['transformers']}, "
          f"llama-cpp-python {v['llama-cpp-python']}, load {cond['load_avg_1m']}; matrix-vector GB/s "
          f"{', '.join(f'{m} {v:.1f}' for m, v in per_mode.items())} -> bound at {gbps:.1f} GB/s; prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, greedy, median of {args.repeats}", flush=True)
    rows, ratios = [], []
    print(f"{'preset':6} {'impl':15} {'dtype':5} {'weights MB':>10} {'TTFT ms':>8} {'decode tok/s':>12} "
          f"{'range':>13} {'bound tok/s':>11} {'% of bound':>10}", flush=True)

    def add(r):
        r["pct_of_bound"] = 100 * r["decode_tok_s"] / r["bound_tok_s"]
        rows.append(r)
        lo, hi = r["decode_tok_s_range"]
        print(f"{r['preset']:6} {r['impl']:15} {r['dtype']:5} {r['weight_MB']:10.1f} {r['ttft_ms']:8.1f} "
              f"{r['decode_tok_s']:12.1f} {f'{lo:.0f}-{hi:.0f}':>13} {r['bound_tok_s']:11.1f} "
              f"{r['pct_of_bound']:9.0f}%", flush=True)

    for preset in [p for p in args.presets.split(",") if p]:
        cfg = get_preset(preset)
        cfg.kernels = "torch"
        torch.manual_seed(0)
        base = GPT(cfg).eval()
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        variants = []  # (row, fn, model or our Decoder)
        with tempfile.TemporaryDirectory() as tmp:
            for mode in modes:
                for compiled in compile_choices:
                    m = quantize(copy.deepcopy(base), mode)
                    wb = weight_bytes_per_token(m)
                    row = {"impl": "furnace+compile" if compiled else "furnace", "preset": preset, "dtype": mode,
                           "weight_MB": wb / 1e6, "bound_tok_s": gbps * 1e9 / wb}
                    dec = Decoder(m)
                    if compiled:
                        t = time.perf_counter()
                        if not dec.compile():
                            raise FurnaceError("--compile: compiling the decode step failed (see the log line above)")
                        row["compile_s"] = time.perf_counter() - t
                    variants.append((row, _ours, dec))
            if hf_modes:
                import transformers
                export_hf(base, Path(tmp) / "hf")
                for mode in hf_modes:
                    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[mode]
                    hf = transformers.AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "hf"), dtype=dt).eval()
                    wb = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if "embed" not in n
                             and "norm" not in n)
                    if cfg.tie_embeddings:
                        wb += hf.lm_head.weight.numel() * hf.lm_head.weight.element_size()
                    variants.append(({"impl": "transformers", "preset": preset, "dtype": mode, "weight_MB": wb / 1e6,
                                      "bound_tok_s": gbps * 1e9 / wb}, _hf, hf))
            if llama_types:
                n_ctx = min(cfg.max_seq_len, args.prompt_len + args.new_tokens + 8)
                variants += _llama_variants(base, preset, llama_types, threads, n_ctx, tmp, gbps)
            runs = [[] for _ in variants]
            for rep in range(args.repeats + 1):                                # the first round is the warm-up
                for i, (_, fn, model) in enumerate(variants):
                    r = fn(model, prompt, args.new_tokens)
                    if rep:
                        runs[i].append(r)
            for _, fn, model in variants:
                if fn is _llama:
                    model.close()                       # frees llama.cpp's model now, not at interpreter exit
        for (row, _, _), rs in zip(variants, runs):
            ttft = [r[0] * 1e3 for r in rs]
            tps = [r[1] for r in rs]
            add({**row, "ttft_ms": statistics.median(ttft), "ttft_ms_range": [min(ttft), max(ttft)],
                 "decode_tok_s": statistics.median(tps), "decode_tok_s_range": [min(tps), max(tps)],
                 "decode_tok_s_runs": tps, "ttft_ms_runs": ttft})
        ratios += _round_ratios([(row, rs) for (row, _, _), rs in zip(variants, runs)])
        del variants, base
    for r in ratios:
        print(f"# {r['preset']} ours {r['ours']} / llama.cpp {r['llama']}, by round: decode tok/s ratio median "
              f"{r['decode_ratio']:.2f} ({r['decode_ratio_range'][0]:.2f}-{r['decode_ratio_range'][1]:.2f}), TTFT "
              f"ratio median {r['ttft_ratio']:.2f} ({r['ttft_ratio_range'][0]:.2f}-{r['ttft_ratio_range'][1]:.2f})")
    cond["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps({"conditions": cond, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                      "repeats": args.repeats, "rows": rows, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    run_cli(main)
