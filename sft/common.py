"""What every fine-tuning method shares: its flags, the job around the Trainer (init from a checkpoint,
tokenizer and chat template saved in OUT/tokenizer/, reading and splitting the data, the run record).
A command (sft/train_<method>.py) gives `run` one function that turns the opened job into a Trainer task
(train/task.py). Kept import-light at the top so `--help` is fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from kernels.common import FurnaceError
from train.options import METAVAR, TrainOptions, add_arguments, options_from_args

log = logging.getLogger("furnace")
DEFAULT_EPOCHS = 2
CHAT_TEMPLATE_FILE = "chat_template.json"
SAMPLE_PROMPT = "Write a Python function that returns the sum of a list of numbers."
CPU_DEFAULTS, GPU_DEFAULTS = dict(batch_size=8, seq_len=512), dict(batch_size=16, seq_len=2048)
# A resumed run must agree on these (besides train.options.RUN_DEFINING).
RESUME_DEFINING = ("kind", "val_data", "skip_bad", "truncate", "beta", "lora_rank", "lora_alpha", "lora_dropout",
                   "lora_targets")


@dataclass(frozen=True)
class Method:
    """What differs per method around the Trainer (its --help lines, defaults and default data)."""
    units: str          # what --batch-size counts
    data: str           # what --data holds
    default_data: str   # what a run without --data trains on ...
    data_dir: str       # ... and its folder (sft/defaults.py writes it)
    init: str           # what --init should be
    defaults: TrainOptions  # learning rates for fine-tuning (pretraining's 1e-3 would wreck an SFT'd model)
    # TrainOptions fields it refuses (not in its --help): the model's shape comes from --init, --tokens counts
    # pretraining tokens; DPO and GRPO have their own loss (no z-loss) and evaluate held-out pairs / prompts
    refused: tuple = ("preset", "tokens", "z_loss", "eval_tokens")
    flags: dict = dataclasses.field(default_factory=dict)  # {field: (default, help)} of a shared flag
    then: str = ""      # the next command, logged after a finished run


METHODS = {
    "sft": Method("examples", "SFT records", "the offline SFT dataset built from the stdlib",
                  "runs/data/stdlib-arith-sft", "a pretrained run, e.g. --init runs/tiny-stdlib-bpe4096",
                  TrainOptions(lr=3e-4, min_lr=3e-5), ("preset", "tokens"),
                  then="then DPO: python sft/train_dpo.py --init {out}"),
    "dpo": Method("preference pairs", "DPO preference records", "the offline DPO dataset built from the stdlib",
                  "runs/data/stdlib-dpo", "an SFT run", TrainOptions(lr=1e-4, min_lr=1e-5, schedule="constant")),
    "grpo": Method("prompts (each sampled --num-generations times)", 'GRPO records ({"prompt": ..., "answer": ...})',
                   "the offline arithmetic task (512 prompts, single-digit answers)", "runs/data/grpo-arith",
                   "an SFT run", TrainOptions(lr=1e-4, min_lr=1e-4, schedule="constant", grad_clip=1.0),
                   flags={"beta": (0.04, "weight of the k3 KL penalty to the --init model; 0 = no reference model; "
                                         "default: 0.04")}),
}


def ft_field(default, help: str, kinds: str = "sft dpo grpo", group: str = "fine-tuning"):
    """A fine-tuning flag: its help line, the methods that have it (space-separated) and its --help group."""
    return dataclasses.field(default=default, metadata={"group": group, "kinds": kinds.split(), "help": help})


LORA = "LoRA (model/lora.py)"


@dataclass
class FinetuneOptions:
    """The flags TrainOptions does not have (saved in OUT/config.json under "finetune")."""
    kind: str = "sft"  # the method: sft | dpo | grpo (not a flag)
    val_data: str = ft_field("", "held-out records (like --data); default: every 20th example of --data (none "
                             "under 40)")
    skip_bad: bool = ft_field(False, "skip bad records (counted in the summary) instead of stopping at the first; "
                              "default: off")
    truncate: bool = ft_field(False, "cut examples longer than --seq-len (oldest turns first, then the end) instead "
                              "of treating them as bad; default: off")
    beta: float = ft_field(0.1, "DPO temperature: how far the policy may move from the reference; default: 0.1",
                           "dpo grpo")
    ref_cache: str = ft_field("", "reference log-prob cache folder; default: runs/cache/dpo-ref", "dpo")
    lora_rank: int = ft_field(0, "rank of the low-rank adapters (e.g. 8 or 16); 0 = full fine-tuning; default: 0",
                              "sft dpo", LORA)
    lora_alpha: float = ft_field(16.0, "adapter scale numerator: the update is scaled by alpha / rank; default: 16",
                                 "sft dpo", LORA)
    lora_dropout: float = ft_field(0.0, "dropout probability on the adapter's input (0 to 1); default: 0 (off)",
                                   "sft dpo", LORA)
    lora_targets: str = ft_field("q,k,v,o", "comma-separated projections that get adapters, any of "
                                 "q,k,v,o,gate,up,down; default: q,k,v,o", "sft dpo", LORA)
    merge: bool = ft_field(False, "after training also write OUT/merged, a full checkpoint with the adapters "
                           "folded in; default: off", "sft dpo", LORA)


def help_overrides(kind: str) -> dict[str, str]:
    """The help lines of TrainOptions fields whose meaning or default differs when fine-tuning."""
    m, d = METHODS[kind], METHODS[kind].defaults
    steps = ("one pass over the prompts (times --num-iterations)" if kind == "grpo"
             else f"{DEFAULT_EPOCHS} epochs over --data")
    return {
        "data": f"{m.data}: .jsonl/.json files, folders of them or hf:NAME[:SPLIT] (formats: sft/README.md); "
                f"default: {m.default_data} ({m.data_dir})",
        "init": f"the checkpoint or run folder to fine-tune (required; {m.init})",
        "max_steps": f"optimizer steps; default: {steps}",
        "batch_size": f"{m.units} per micro-batch per device; default: {CPU_DEFAULTS['batch_size']} on CPU, "
                      f"{GPU_DEFAULTS['batch_size']} on CUDA",
        "seq_len": f"tokens per sequence; default: {CPU_DEFAULTS['seq_len']} on CPU, {GPU_DEFAULTS['seq_len']} on "
                   f"CUDA (capped by the model's context)",
        "lr": f"peak learning rate; default: {d.lr:g}",
        "min_lr": f"learning rate at the end of the schedule; default: {d.min_lr:g}",
        "schedule": f"learning-rate decay after warm-up; default: {d.schedule}",
        "grad_clip": f"clip the gradient's global L2 norm to this; 0 = off; default: {d.grad_clip:g}",
        "out": f"run folder; default: runs/{kind}-<init folder name>, or -2, -3... when taken",
        "sample_prompt": "user message answered at each evaluation (printed and saved in samples.jsonl); \"none\" = "
                         "no samples; default: a request for a small Python function",
    }


def parse(kind: str, description: str, argv, own=None):
    """The method's flags: TrainOptions' with its own defaults, FinetuneOptions' and those of `own` (a dataclass
    of `ft_field`s: a method's options of its own, GRPO's) -> (TrainOptions, FinetuneOptions, own or None)."""
    from kernels.common import EXIT_CODES
    m = METHODS[kind]
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=EXIT_CODES)
    add_arguments(ap, m.defaults, exclude=m.refused, help_overrides=help_overrides(kind))
    groups: dict = {}
    fields = dataclasses.fields(FinetuneOptions)[1:] + (dataclasses.fields(own) if own else ())
    for f in (f for f in fields if kind in f.metadata["kinds"]):
        default, text = m.flags.get(f.name, (f.default, f.metadata["help"]))
        name = f.metadata["group"]
        g = groups[name] = groups.get(name) or ap.add_argument_group(name)
        kw = ({"action": "store_true"} if f.type == "bool" else
              {"type": {"int": int, "float": float, "str": str}[f.type], "metavar": METAVAR[f.type]})
        g.add_argument("--" + f.name.replace("_", "-"), default=default, help=text, **kw)
    args = ap.parse_args(argv)
    opts = options_from_args(args, m.defaults)
    ft = FinetuneOptions(kind, **{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneOptions)[1:]
                                  if hasattr(args, f.name)})
    from model.lora import validate as validate_lora
    validate_lora(ft.lora_rank, ft.lora_alpha, ft.lora_dropout, ft.lora_targets)
    if ft.merge and not ft.lora_rank:
        raise FurnaceError("--merge writes the base with the LoRA adapters folded in: use it with --lora-rank R")
    if not opts.init:
        raise FurnaceError(f"--init is required: the checkpoint or run folder to fine-tune ({m.init})")
    if kind == "dpo" and not ft.beta > 0:
        raise FurnaceError(f"--beta {ft.beta}: expected > 0 (e.g. 0.1)")
    return opts, ft, own(**{f.name: getattr(args, f.name) for f in dataclasses.fields(own)}) if own else None


@dataclass
class Job:
    """A fine-tuning run, opened: its folder, the checkpoint it resumes, the --init checkpoint, the tokenizer
    (with the chat tokens) and the model (the --init weights on the run's device, with adapters under LoRA)."""
    run_dir: Path
    resume: Path | None
    init_ckpt: Path
    tok: object
    model: object


def run(opts: TrainOptions, ft: FinetuneOptions, make_task, sections: dict | None = None) -> int:
    """Open the job, `make_task(opts, ft, rt, job) -> (task, record)`, train -> the exit code. Writes nothing
    before the data has been read (make_task saves the tokenizer through read_data). `sections`: the method's
    own config.json sections a resumed run must agree on, {name: (values, defining fields)}."""
    from data.chat_template import encode_chat, stop_ids
    from infer.generation import PromptSampler
    from kernels.common import EXIT_INTERRUPTED
    from train.setup import init_runtime
    from train.trainer import Trainer
    with init_runtime(opts) as rt:
        job = open_job(opts, ft, rt, sections)
        task, record = make_task(opts, ft, rt, job)
        if opts.sample_prompt != "none":  # the fixed user message answered at each evaluation
            ids = encode_chat(job.tok, [{"role": "user", "content": opts.sample_prompt or SAMPLE_PROMPT}], True)
            task.sample = PromptSampler(job.tok, ids, max_new_tokens=64, stop_ids=stop_ids(job.tok))
        trainable = sum(p.numel() for p in job.model.parameters() if p.requires_grad)
        record = {"finetune": asdict(ft), "init_checkpoint": str(job.init_ckpt), "chat_template": "chatml",
                  "trainable_params": trainable, **record}
        trainer = Trainer(opts, task, job.model, rt, job.run_dir, resume=job.resume,
                          tokenizer_dir=job.run_dir / "tokenizer")
        summary = trainer.run(record)
        if ft.merge and rt.is_main:
            from model.io import latest_checkpoint
            from sft.merge_lora import merge_checkpoint
            out = merge_checkpoint(latest_checkpoint(job.run_dir), job.run_dir / "merged")
            log.info(f"--merge: full checkpoint with the adapters folded in: {out}")
        log.info(f"chat with it: python infer/chat.py --ckpt {job.run_dir}")
        if summary.get("interrupted"):
            return EXIT_INTERRUPTED
        if METHODS[ft.kind].then:
            log.info(METHODS[ft.kind].then.format(out=opts.out))
        return 0


def open_job(opts: TrainOptions, ft: FinetuneOptions, rt, sections: dict | None = None) -> Job:
    """Defaults resolved into `opts` (data, batch size, seq_len, out), the run folder checked, the model built
    (with LoRA adapters when asked)."""
    from data.chat_template import ensure_chat_tokens
    from data.tokenizer import TOKENIZER_FILE, load_tokenizer
    from model.io import load_config, resolve_checkpoint
    from train.setup import build_model, check_seq_len, open_run_dir

    init_ckpt = resolve_checkpoint(opts.init)
    if not (init_ckpt / TOKENIZER_FILE).is_file():
        raise FurnaceError(f"--init {init_ckpt}: has no {TOKENIZER_FILE}; fine-tuning needs the tokenizer the model "
                           f"was trained with (copy it into that checkpoint folder)")
    if not opts.data:
        from sft.defaults import build_default_data
        m = METHODS[ft.kind]
        if rt.is_main:
            build_default_data(ft.kind)
        rt.barrier()
        opts.data, ft.val_data = f"{m.data_dir}/train.jsonl", ft.val_data or f"{m.data_dir}/val.jsonl"
        log.info(f"data: {m.default_data} ({m.data_dir})")
    d = GPU_DEFAULTS if rt.device.type == "cuda" else CPU_DEFAULTS
    opts.batch_size = opts.batch_size or d["batch_size"]
    opts.seq_len = opts.seq_len or min(d["seq_len"], load_config(init_ckpt).max_seq_len)
    run_dir, resume = open_run_dir(opts, f"{ft.kind}-{Path(opts.init).resolve().name}",
                                   {"finetune": (asdict(ft), RESUME_DEFINING), **(sections or {})})
    tok = load_tokenizer(init_ckpt)
    model = build_model(opts, None, rt)
    ensure_chat_tokens(tok, model)
    check_seq_len(opts.seq_len, model.config, f"--init {init_ckpt}")
    if ft.lora_rank:
        add_lora(model, init_ckpt.resolve(), ft)
    return Job(run_dir, resume, init_ckpt, tok, model)


def add_lora(model, base: Path, ft: FinetuneOptions) -> None:
    """Freeze the --init model and add adapters; checkpoints then hold the adapters and the base's path and
    sha256 (model/lora.py)."""
    from model.fileio import sha256_file
    from model.io import load_config, weights_file
    from model.lora import LoRAConfig, apply_lora, parse_targets
    if model.config.vocab_size != load_config(base).vocab_size:
        raise FurnaceError(f"--lora-rank: --init {base} has no chat tokens, so fine-tuning grows its embeddings, which "
                           f"LoRA keeps frozen; run a full SFT first (without --lora-rank), then LoRA on top of it")
    cfg = LoRAConfig(ft.lora_rank, ft.lora_alpha, ft.lora_dropout, parse_targets(ft.lora_targets), str(base),
                     sha256_file(weights_file(base)))
    apply_lora(model, cfg)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(f"LoRA: rank {cfg.rank}, alpha {cfg.alpha}, dropout {cfg.dropout}, targets {','.join(cfg.targets)}: "
             f"{n:,} trainable of {total:,} parameters ({100 * n / total:.2f}%); base {base} frozen")


def read_data(opts: TrainOptions, ft: FinetuneOptions, job: Job, parse_record, build, rank: int = 0):
    """--data (and --val-data) records -> (train, val, record): each record parsed (sft.formats) and built
    (tokenized through the template); bad ones reported as FILE:LINE or, with --skip-bad, counted.
    Validation: --val-data when given, else every 20th item (at most 200) when there are >= 40. Then rank 0
    saves OUT/tokenizer/{tokenizer.json, chat_template.json}, which every checkpoint copies."""
    from data.chat_template import JINJA_TEMPLATE, STOP_TOKENS
    from model.fileio import atomic_write_json
    from sft.formats import BadRecords, expand_data_arg, iter_records
    bad = BadRecords(skip=ft.skip_bad)

    def read(arg: str) -> list:
        out = []
        for where, rec in (r for src in expand_data_arg(arg) for r in iter_records(src, bad)):
            try:
                out.append(build(parse_record(rec)))
            except FurnaceError as e:
                bad.report(where, str(e))
        return out

    items = read(opts.data)
    k = max(20, len(items) // 200)
    if ft.val_data:
        train, val = items, read(ft.val_data)
    elif len(items) < 40:
        log.info(f"validation: only {len(items)} examples and no --val-data: no held-out set")
        train, val = items, []
    else:
        train, val = [x for i, x in enumerate(items) if i % k], [x for i, x in enumerate(items) if not i % k]
    log.info(bad.summary("data"))
    if not train:
        raise FurnaceError(f"--data {opts.data}: no usable training {METHODS[ft.kind].units.split(' (')[0]}")
    if rank == 0:
        job.tok.save(job.run_dir / "tokenizer")
        atomic_write_json(job.run_dir / "tokenizer" / CHAT_TEMPLATE_FILE, {
            "format": "chatml", "source": "data/chat_template.py", "stop_tokens": list(STOP_TOKENS),
            "trained": "assistant replies (with <think> blocks) and their <|im_end|>", "jinja": JINJA_TEMPLATE})
    return train, val, {"bad_records_skipped": bad.count, "train_examples": len(train), "val_examples": len(val)}


def set_max_steps(opts: TrainOptions, world_size: int, units_per_epoch: int, epochs: int = DEFAULT_EPOCHS,
                  times: int = 1) -> None:
    """--max-steps left at 0: `epochs` passes over the data (each batch used `times` times)."""
    if not opts.max_steps:
        per_step = opts.batch_size * opts.grad_accum * world_size
        opts.max_steps = max(1, -(-epochs * units_per_epoch // per_step)) * times
