"""Distil a teacher checkpoint into a student, on pretraining shards (the teacher never trains).

    python sft/train_distill.py --teacher runs/big --preset tiny                     # a fresh student
    python sft/train_distill.py --teacher runs/big --init runs/small --data runs/data/fineweb --alpha 0.5 --temperature 2
Loss per target token: (1 - alpha) CE(labels) + alpha T^2 KL(teacher || student) at temperature T (sft/distill.py,
kernels/fused_linear_distill.py: chunked, neither model's full logits are held). Teacher, student and data
must share the tokenizer (compared by hash). All of train/pretrain.py's flags apply.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402

from kernels.common import EXIT_INTERRUPTED, FurnaceError, run_cli  # noqa: E402
from train.options import add_arguments, options_from_args  # noqa: E402

log = logging.getLogger("furnace")
TEACHER_DTYPES = ("auto", "fp32", "bf16", "fp16")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    g = ap.add_argument_group("distillation")
    g.add_argument("--teacher", required=True,
                   help="teacher checkpoint or run folder, trained with the same tokenizer (required)")
    g.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term, in [0, 1] (default: 0.5)")
    g.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T > 0 (default: 2)")
    g.add_argument("--teacher-dtype", choices=TEACHER_DTYPES, default="auto",
                   help="the teacher's own precision; auto = bf16 on CUDA, fp32 on CPU; default: auto")
    args = ap.parse_args(argv)
    opts = options_from_args(args)
    if not 0.0 <= args.alpha <= 1.0:
        raise FurnaceError(f"--alpha {args.alpha}: expected a weight in [0, 1] (0 = labels only, 1 = teacher only)")
    if not args.temperature > 0:
        raise FurnaceError(f"--temperature {args.temperature}: expected > 0 (e.g. 2)")
    if not (opts.init or opts.preset):
        raise FurnaceError("the student: pass --init CKPT (a trained student) or --preset NAME (a fresh one)")
    from data import check_tokenizer_match, load_tokenizer
    from model.flops import flops_per_token
    from model.io import load, resolve_checkpoint
    from sft.distill import DistillTask
    from train.precision import DTYPES
    from train.pretrain import build
    from train.setup import init_runtime

    teacher_ckpt = resolve_checkpoint(args.teacher)
    if not (teacher_ckpt / "tokenizer.json").is_file():
        raise FurnaceError(f"--teacher {teacher_ckpt}: has no tokenizer.json, so it cannot be checked against the "
                           f"student's data; copy the teacher's tokenizer.json into that folder")
    teacher_sha = load_tokenizer(teacher_ckpt).sha256
    with init_runtime(opts) as rt:
        dt = args.teacher_dtype if args.teacher_dtype != "auto" else "bf16" if rt.device.type == "cuda" else "fp32"

        def make_task(loader, val, eval_batches, model, data_dir):
            check_tokenizer_match(loader.tokenizer_sha256, teacher_sha, f"data {data_dir}", f"--teacher {teacher_ckpt}")
            teacher = load(teacher_ckpt, device=rt.device, dtype=DTYPES[dt])
            if teacher.config.vocab_size != model.config.vocab_size:
                raise FurnaceError(f"--teacher {teacher_ckpt}: vocabulary of {teacher.config.vocab_size} rows, the "
                                   f"student has {model.config.vocab_size}; teacher and student must share the "
                                   f"tokenizer and vocab size")
            log.info(f"distillation: teacher {teacher_ckpt} ({teacher.num_params() / 1e6:.2f}M params, {dt}, "
                     f"inference mode) -> student {model.num_params() / 1e6:.2f}M; alpha {args.alpha}, "
                     f"T {args.temperature}")
            fpu = flops_per_token(model.config, opts.seq_len) + flops_per_token(teacher.config, opts.seq_len) / 3
            return DistillTask(teacher, args.alpha, args.temperature, loader, val, eval_batches, fpu)

        trainer, record = build(opts, rt, make_task)
        record["distill"] = {"teacher": str(teacher_ckpt), "alpha": args.alpha, "temperature": args.temperature,
                             "teacher_dtype": dt}
        try:
            return EXIT_INTERRUPTED if trainer.run(record).get("interrupted") else 0
        finally:
            trainer.task.train_loader.close()
            trainer.task.val_loader.close()


if __name__ == "__main__":
    run_cli(main)
