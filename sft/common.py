"""What every fine-tuning method shares: its flags, the job around the Trainer (init from a checkpoint,
tokenizer and chat template saved in OUT/tokenizer/, reading and splitting the data, the run record).

A method (sft/train_sft.py, sft/train_dpo.py) gives `run` one function that turns the opened job into a
Trainer task (train/task.py). Kept import-light at the top so `--help` is fast.
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
# Learning rates for fine-tuning (pretraining's 1e-3 would wreck an SFT'd model) and the device defaults.
DEFAULTS = {"sft": TrainOptions(lr=3e-4, min_lr=3e-5), "dpo": TrainOptions(lr=1e-4, min_lr=1e-5, schedule="constant"),
            "grpo": TrainOptions(lr=1e-4, min_lr=1e-4, schedule="constant", grad_clip=1.0)}
CPU_DEFAULTS, GPU_DEFAULTS = dict(batch_size=8, seq_len=512), dict(batch_size=16, seq_len=2048)
# A resumed run must agree on these (besides train.options.RUN_DEFINING).
RESUME_DEFINING = ("kind", "val_data", "skip_bad", "truncate", "beta", "lora_rank", "lora_alpha", "lora_dropout",
                   "lora_targets")


def _ft(default, group: str, kinds: str, help: str):
    """A FinetuneOptions flag: its --help group, the methods that have it (space-separated) and its help line."""
    return dataclasses.field(default=default, metadata={"group": group, "kinds": kinds.split(), "help": help})


LORA = "LoRA (model/lora.py)"


@dataclass
class FinetuneOptions:
    """The flags TrainOptions does not have (saved in OUT/config.json under "finetune"). GRPO's --beta (the KL
    weight, default 0.04) is its own flag (sft/train_grpo.py) stored here."""
    kind: str = "sft"  # the method: sft | dpo | grpo (not a flag)
    val_data: str = _ft("", "fine-tuning", "sft dpo grpo",
                        "held-out records (like --data); default: every 20th example of --data (none under 40)")
    skip_bad: bool = _ft(False, "fine-tuning", "sft dpo grpo",
                         "skip bad records (counted in the summary) instead of stopping at the first; default: off")
    truncate: bool = _ft(False, "fine-tuning", "sft dpo grpo", "cut examples longer than --seq-len (oldest turns "
                         "first, then the end) instead of treating them as bad; default: off")
    beta: float = _ft(0.1, "fine-tuning", "dpo",
                      "DPO temperature: how far the policy may move from the reference; default: 0.1")
    ref_cache: str = _ft("", "fine-tuning", "dpo", "reference log-prob cache folder; default: runs/cache/dpo-ref")
    lora_rank: int = _ft(0, LORA, "sft dpo",
                         "rank of the low-rank adapters (e.g. 8 or 16); 0 = full fine-tuning; default: 0")
    lora_alpha: float = _ft(16.0, LORA, "sft dpo",
                            "adapter scale numerator: the update is scaled by alpha / rank; default: 16")
    lora_dropout: float = _ft(0.0, LORA, "sft dpo", "dropout probability on the adapter's input (0 to 1); "
                              "default: 0 (off)")
    lora_targets: str = _ft("q,k,v,o", LORA, "sft dpo", "comma-separated projections that get adapters, any of "
                            "q,k,v,o,gate,up,down; default: q,k,v,o")
    merge: bool = _ft(False, LORA, "sft dpo", "after training also write OUT/merged, a full checkpoint with the "
                      "adapters folded in; default: off")


UNITS = {"sft": "examples", "dpo": "preference pairs", "grpo": "prompts (each sampled --num-generations times)"}
DATA_HELP = {"sft": "SFT records", "dpo": "DPO preference records",
             "grpo": "GRPO records ({\"prompt\": ..., \"answer\": ...})"}
DEFAULT_DATA = {"sft": "the offline SFT dataset built from the stdlib",
                "dpo": "the offline DPO dataset built from the stdlib",
                "grpo": "the offline arithmetic task (runs/data/grpo-arith)"}
INIT_HELP = {"sft": "a pretrained run, e.g. --init runs/tiny-stdlib-bpe4096", "dpo": "an SFT run", "grpo": "an SFT run"}


def help_overrides(kind: str) -> dict[str, str]:
    """The help lines of TrainOptions fields whose meaning or default differs when fine-tuning."""
    d = DEFAULTS[kind]
    steps = ("one pass over the prompts (times --num-iterations)" if kind == "grpo"
             else f"{DEFAULT_EPOCHS} epochs over --data")
    return {
        "data": f"{DATA_HELP[kind]}: .jsonl/.json files, folders of them or hf:NAME[:SPLIT] "
                f"(formats: sft/README.md); default: {DEFAULT_DATA[kind]}",
        "init": f"the checkpoint or run folder to fine-tune (required; {INIT_HELP[kind]})",
        "max_steps": f"optimizer steps; default: {steps}",
        "batch_size": f"{UNITS[kind]} per micro-batch per device; default: {CPU_DEFAULTS['batch_size']} on CPU, "
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


# TrainOptions fields a method refuses (not listed in its --help): the model's shape comes from --init, --tokens
# counts pretraining tokens; DPO has no z-loss and evaluates every held-out pair; GRPO's loss is its own (no
# z-loss) and it evaluates the held-out prompts' greedy replies (up to 64), not a token budget.
REFUSED = {"sft": ("preset", "tokens"), "dpo": ("preset", "tokens", "z_loss", "eval_tokens"),
           "grpo": ("preset", "tokens", "z_loss", "eval_tokens")}


def parse(kind: str, description: str, argv, parents=()) -> tuple[TrainOptions, FinetuneOptions]:
    """The method's flags: TrainOptions' with its own defaults, plus FinetuneOptions'; checked here.
    `parents`: argparse parsers (add_help=False) holding a method's own flags, so --help shows them (GRPO)."""
    from kernels.common import EXIT_CODES
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=EXIT_CODES, parents=list(parents))
    add_arguments(ap, DEFAULTS[kind], exclude=REFUSED[kind], help_overrides=help_overrides(kind))
    groups: dict = {}
    for f in dataclasses.fields(FinetuneOptions)[1:]:
        if kind in f.metadata["kinds"]:
            name = f.metadata["group"]
            g = groups[name] = groups.get(name) or ap.add_argument_group(name)
            kw = ({"action": "store_true"} if f.type == "bool" else
                  {"type": {"int": int, "float": float, "str": str}[f.type], "metavar": METAVAR[f.type]})
            g.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"], **kw)
    args = ap.parse_args(argv)
    opts = options_from_args(args, DEFAULTS[kind])
    ft = FinetuneOptions(kind=kind, **{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneOptions)
                                       if f.name != "kind" and hasattr(args, f.name)})
    from model.lora import validate as validate_lora
    validate_lora(ft.lora_rank, ft.lora_alpha, ft.lora_dropout, ft.lora_targets)
    if ft.merge and not ft.lora_rank:
        raise FurnaceError("--merge writes the base with the LoRA adapters folded in: use it with --lora-rank R")
    if not opts.init:
        raise FurnaceError(f"--init is required: the checkpoint or run folder to fine-tune ({INIT_HELP[kind]})")
    if kind == "dpo" and not ft.beta > 0:
        raise FurnaceError(f"--beta {ft.beta}: expected > 0 (e.g. 0.1)")
    return opts, ft


@dataclass
class Job:
    """A fine-tuning run, opened: where it writes, what it resumes, the --init checkpoint, its tokenizer
    (with the chat tokens) and the model (the --init weights, on the run's device)."""
    run_dir: Path
    resume: Path | None
    init_ckpt: Path
    tok: object
    model: object


def run(opts: TrainOptions, ft: FinetuneOptions, make_task, sections: dict | None = None) -> dict:
    """Open the job, `make_task(opts, ft, rt, job) -> (task, record)`, train. Writes nothing before the
    data has been read (make_task saves the tokenizer through read_data). `sections`: the method's own
    config.json sections a resumed run must agree on, {name: (values, defining fields)}."""
    from train.setup import init_runtime
    from train.trainer import Trainer
    with init_runtime(opts) as rt:
        job = open_job(opts, ft, rt, sections)
        if ft.lora_rank:
            add_lora(job, ft)
        task, record = make_task(opts, ft, rt, job)
        if opts.sample_prompt != "none":
            task.sample = chat_sampler(job.tok, opts.sample_prompt or SAMPLE_PROMPT)
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
        return summary


def add_lora(job: Job, ft: FinetuneOptions) -> None:
    """Freeze the --init model and add adapters; checkpoints then hold the adapters and the base's path and
    sha256 (model/lora.py)."""
    from model.fileio import sha256_file
    from model.io import load_config, weights_file
    from model.lora import LoRAConfig, apply_lora, parse_targets
    base = job.init_ckpt.resolve()
    if job.model.config.vocab_size != load_config(base).vocab_size:
        raise FurnaceError(f"--lora-rank: --init {base} has no chat tokens, so fine-tuning grows its embeddings, which "
                           f"LoRA keeps frozen; run a full SFT first (without --lora-rank), then LoRA on top of it")
    cfg = LoRAConfig(ft.lora_rank, ft.lora_alpha, ft.lora_dropout, parse_targets(ft.lora_targets), str(base),
                     sha256_file(weights_file(base)))
    apply_lora(job.model, cfg)
    n = sum(p.numel() for p in job.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in job.model.parameters())
    log.info(f"LoRA: rank {cfg.rank}, alpha {cfg.alpha}, dropout {cfg.dropout}, targets {','.join(cfg.targets)}: "
             f"{n:,} trainable of {total:,} parameters ({100 * n / total:.2f}%); base {base} frozen")


SAMPLE_PROMPT = "Write a Python function that returns the sum of a list of numbers."


def chat_sampler(tok, text: str):
    """The fixed user message answered at each evaluation, through the one chat template."""
    from data.chat_template import encode_chat, stop_ids
    from infer.generation import PromptSampler
    ids = encode_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)
    return PromptSampler(tok, ids, max_new_tokens=64, stop_ids=stop_ids(tok))


def open_job(opts: TrainOptions, ft: FinetuneOptions, rt, sections: dict | None = None) -> Job:
    """Defaults resolved into `opts` (data, batch size, seq_len, out), the run folder checked, the model built."""
    from data.chat_template import ensure_chat_tokens
    from data.tokenizer import TOKENIZER_FILE, load_tokenizer
    from model.io import load_config, resolve_checkpoint
    from sft.defaults import DEFAULT_DPO_DIR, DEFAULT_SFT_DIR, build_default_datasets
    from train.setup import build_model, check_seq_len, open_run_dir

    init_ckpt = resolve_checkpoint(opts.init)
    if not (init_ckpt / TOKENIZER_FILE).is_file():
        raise FurnaceError(f"--init {init_ckpt}: has no {TOKENIZER_FILE}; fine-tuning needs the tokenizer the model "
                           f"was trained with (copy it into that checkpoint folder)")
    if not opts.data:
        if rt.is_main:
            build_default_datasets()
        rt.barrier()
        base = DEFAULT_SFT_DIR if ft.kind == "sft" else DEFAULT_DPO_DIR
        opts.data, ft.val_data = str(base / "train.jsonl"), ft.val_data or str(base / "val.jsonl")
        log.info(f"data: the offline default {ft.kind.upper()} dataset ({base}, built from the standard library)")
    d = GPU_DEFAULTS if rt.device.type == "cuda" else CPU_DEFAULTS
    opts.batch_size = opts.batch_size or d["batch_size"]
    opts.seq_len = opts.seq_len or min(d["seq_len"], load_config(init_ckpt).max_seq_len)
    run_dir, resume = open_run_dir(opts, f"{ft.kind}-{Path(opts.init).resolve().name}",
                                   {"finetune": (asdict(ft), RESUME_DEFINING), **(sections or {})})
    tok = load_tokenizer(init_ckpt)
    model = build_model(opts, None, rt)
    ensure_chat_tokens(tok, model)
    check_seq_len(opts.seq_len, model.config, f"--init {init_ckpt}")
    return Job(run_dir, resume, init_ckpt, tok, model)


def read_data(opts: TrainOptions, ft: FinetuneOptions, job: Job, parse_record, build, rank: int = 0):
    """--data (and --val-data) records -> (train, val, record): each record parsed (sft.formats) and built
    (tokenized through the template); bad ones reported as FILE:LINE or, with --skip-bad, counted.
    Validation: --val-data when given, else every 20th item (at most 200) when there are >= 40. Then the
    tokenizer and chat template are saved in OUT/tokenizer/ (by rank 0), copied into every checkpoint."""
    from sft.formats import BadRecords, expand_data_arg, iter_records
    bad = BadRecords(skip=ft.skip_bad)

    def read(arg: str) -> list:
        out = []
        for src in expand_data_arg(arg):
            for where, rec in iter_records(src, bad):
                try:
                    out.append(build(parse_record(rec)))
                except FurnaceError as e:
                    bad.report(where, str(e))
        return out

    items = read(opts.data)
    if ft.val_data:
        train, val = items, read(ft.val_data)
    elif len(items) < 40:
        log.info(f"validation: only {len(items)} examples and no --val-data: no held-out set")
        train, val = items, []
    else:
        k = max(20, len(items) // 200)
        train, val = [x for i, x in enumerate(items) if i % k], [x for i, x in enumerate(items) if not i % k]
    log.info(bad.summary("data"))
    if not train:
        what = {"sft": "examples", "dpo": "preference pairs"}.get(ft.kind, "prompts")
        raise FurnaceError(f"--data {opts.data}: no usable training {what}")
    if rank == 0:
        save_tokenizer(job.tok, job.run_dir)
    return train, val, {"bad_records_skipped": bad.count, "train_examples": len(train), "val_examples": len(val)}


def save_tokenizer(tok, run_dir: Path) -> Path:
    """OUT/tokenizer/{tokenizer.json, chat_template.json}: save_checkpoint copies both into each checkpoint."""
    from data.chat_template import JINJA_TEMPLATE, STOP_TOKENS
    from model.fileio import atomic_write_json
    d = run_dir / "tokenizer"
    tok.save(d)
    meta = {"format": "chatml", "source": "data/chat_template.py", "stop_tokens": list(STOP_TOKENS),
            "trained": "assistant replies (with <think> blocks) and their <|im_end|>", "jinja": JINJA_TEMPLATE}
    atomic_write_json(d / CHAT_TEMPLATE_FILE, meta)
    return d


def set_max_steps(opts: TrainOptions, world_size: int, units_per_epoch: int) -> None:
    """--max-steps left at 0: DEFAULT_EPOCHS passes over the data."""
    if not opts.max_steps:
        per_step = opts.batch_size * opts.grad_accum * world_size
        opts.max_steps = max(1, -(-DEFAULT_EPOCHS * units_per_epoch // per_step))
