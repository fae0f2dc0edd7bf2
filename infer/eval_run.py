"""What infer/evaluate.py does: load once, run lm-eval tasks and/or validation perplexity, record the setup."""
from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path

from infer.runtime import load_for_inference, set_threads
from kernels.common import FurnaceError
from model.io import resolve_checkpoint

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
        Path(args.output).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(text)
    return 0
