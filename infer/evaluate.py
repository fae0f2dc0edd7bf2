"""Evaluate a Furnace checkpoint with EleutherAI lm-eval, and/or its perplexity on validation shards.

    python infer/evaluate.py --ckpt runs/base --tasks hellaswag,arc_easy --batch-size 8
    python infer/evaluate.py --ckpt runs/base --tasks my_task --include-path tasks/ --offline
    python infer/evaluate.py --ckpt runs/base --ppl data/stdlib
Results (with lm-eval's task versions, shots, batch size, chat-template use) go to stdout as JSON on
the last line and to --output when given. Offline use: see infer/README.md.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file, this folder would be first on sys.path and lm-eval's `import evaluate` (the Hugging Face
    # package) would find this script: run it as the module infer.evaluate instead (repo root on the path).
    import os
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    os.execve(sys.executable, [sys.executable, "-m", "infer.evaluate", *sys.argv[1:]], env)

import argparse  # noqa: E402
import logging  # noqa: E402

from kernels.common import FurnaceError, run_cli  # noqa: E402

log = logging.getLogger("furnace")


def run_lm_eval(lm, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
                limit: float | None = None, apply_chat_template: bool = False, seed: int = 1234) -> dict:
    """Run lm-eval's simple_evaluate on a FurnaceLM; returns the JSON-ready summary."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).is_dir():
        raise FurnaceError(f"--include-path {include_path}: no such folder of task YAMLs")
    tm = None
    if include_path:  # indexing lm-eval's thousands of bundled YAMLs takes seconds: skip when all are local
        tm = TaskManager(include_path=include_path, include_defaults=False)
        if not all(tm.match_tasks([t]) for t in tasks):
            tm = None
    tm = tm or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not tm.match_tasks([t])]
    if unknown:
        raise FurnaceError(f"--tasks: unknown lm-eval task(s) {unknown}; list them with `lm-eval ls tasks`, or pass "
                           f"--include-path for local task YAMLs")
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, batch_size=lm.batch_size,
                                  limit=limit, apply_chat_template=apply_chat_template, task_manager=tm,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0)
    return {"results": res["results"], "versions": res.get("versions"), "n-shot": res.get("n-shot"),
            "batch_size": lm.batch_size, "chat_template": bool(apply_chat_template), "limit": limit,
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown")}


def run_evaluation(args) -> int:
    """Load once, run lm-eval tasks and/or validation perplexity, record the setup."""
    import datetime
    import json
    import os

    from infer.runtime import load_for_inference, set_threads
    from model.io import resolve_checkpoint
    if not args.tasks and not args.ppl:
        raise FurnaceError("nothing to do: pass --tasks NAME[,NAME...] and/or --ppl DATA_DIR")
    if args.batch_size < 1:
        raise FurnaceError(f"--batch-size {args.batch_size}: expected a positive integer")
    if args.output and Path(args.output).exists():
        raise FurnaceError(f"--output {args.output} already exists; choose a new file (results are never overwritten)")
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    set_threads(args.threads)
    model, tok, mode = load_for_inference(args.ckpt, args.device, args.dtype, args.tokenizer)
    summary = {"checkpoint": str(resolve_checkpoint(args.ckpt)), "dtype": mode, "device": str(args.device),
               "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if args.tasks:
        from infer.lm_eval_adapter import FurnaceLM
        lm = FurnaceLM(model, tok, batch_size=args.batch_size)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        summary["lm_eval"] = run_lm_eval(lm, tasks, args.include_path, args.num_fewshot, args.limit,
                                         args.apply_chat_template, args.seed)
        from lm_eval.utils import make_table
        print(make_table({"results": summary["lm_eval"]["results"], "versions": summary["lm_eval"]["versions"],
                          "n-shot": summary["lm_eval"]["n-shot"], "higher_is_better": {}}))
    if args.ppl:
        from infer.perplexity import val_perplexity
        summary["perplexity"] = val_perplexity(model, args.ppl, tok, args.ppl_seq_len, args.ppl_max_tokens,
                                               args.batch_size)
        p = summary["perplexity"]
        log.info(f"perplexity on {args.ppl} val: {p['ppl']:.3f} (loss {p['loss']:.4f} over {p['tokens']} tokens)")
    text = json.dumps(summary, default=str)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        from model.fileio import atomic_write_json  # the one atomic write
        atomic_write_json(args.output, summary, default=str)
    print(text)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder or training run folder (its newest checkpoint); required")
    p.add_argument("--tokenizer", help="tokenizer.json or folder holding it (default: the checkpoint's)")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task names; default: none (e.g. with only --ppl)")
    p.add_argument("--include-path", help="folder of extra task YAMLs (local tasks); default: none")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt; default: each task's own")
    p.add_argument("--batch-size", type=int, default=8, help="sequences scored together; default: 8")
    p.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction if < 1); default: all")
    p.add_argument("--apply-chat-template", action="store_true", help="format prompts with the chat template; default: off")
    p.add_argument("--offline", action="store_true",
                   help="never reach the Hugging Face hub (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1); default: off")
    p.add_argument("--ppl", metavar="DATA_DIR", help="also report perplexity on this data folder's val shards; default: none")
    p.add_argument("--ppl-seq-len", type=int, default=None, help="window for --ppl (default: the model's context)")
    p.add_argument("--ppl-max-tokens", type=int, default=None, help="score at most this many --ppl tokens; default: all")
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32", help="weight precision; default: fp32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto; default: cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads; default: physical cores")
    p.add_argument("--seed", type=int, default=1234, help="seed for lm-eval's sampling of examples; default: 1234")
    p.add_argument("--output", help="also write the results JSON here (refuses to overwrite); default: none")
    return run_evaluation(p.parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
