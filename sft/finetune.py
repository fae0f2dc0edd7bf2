"""The SFT and DPO jobs behind sft/train_sft.py and sft/train_dpo.py.

Both: --init checkpoint -> model + tokenizer (chat tokens added if missing), the tokenizer and the chat
template saved in OUT/tokenizer/ (copied into every checkpoint), data read and tokenized through the one
template, then the shared training loop (train/runner.py: optimizer, FP8, compile, DDP, checkpoints,
resume, wandb). SFT packs examples with document masking; DPO computes (or loads) the cached reference
log-probs with the init model before it starts to train, so only the policy is ever held.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from data.chat_template import JINJA_TEMPLATE, STOP_TOKENS, ensure_chat_tokens
from data.tokenizer import TOKENIZER_FILE, load_tokenizer
from model.errors import FurnaceError
from model.fileio import atomic_write_json
from model.flops import flops_per_token
from model.io import load_config, resolve_checkpoint
from sft.defaults import DEFAULT_DPO_DIR, DEFAULT_SFT_DIR, build_default_datasets
from sft.dpo import (PairLoader, cached_reference_logps, count_pairs, dpo_step, evaluate_pairs, file_sha256,
                     reference_logps)
from sft.examples import build_sft_example
from sft.ft_options import RESUME_DEFINING, FinetuneOptions
from sft.formats import BadRecords, dpo_messages, expand_data_arg, iter_records, sft_messages
from sft.packing import PackedSFTLoader
from train.checkpoint import check_out_dir
from train.options import RUN_DEFINING, TrainOptions
from train.runner import run_loop
from train.setup import Runtime, build_model, check_seq_len, default_out, latest_default_out, with_runtime

log = logging.getLogger("furnace")
CPU_DEFAULTS = {"sft": dict(batch_size=8, seq_len=512), "dpo": dict(batch_size=8, seq_len=512)}
GPU_DEFAULTS = {"sft": dict(batch_size=16, seq_len=2048), "dpo": dict(batch_size=16, seq_len=2048)}
DEFAULT_EPOCHS = 2
CHAT_TEMPLATE_FILE = "chat_template.json"


# ---- shared set-up ---------------------------------------------------------------------------------
def _defaults(opts: TrainOptions, ft: FinetuneOptions, rt: Runtime, max_seq_len: int) -> None:
    """Batch size and seq_len left at 0 -> the device's defaults (capped by the --init model's context)."""
    d = (GPU_DEFAULTS if rt.device.type == "cuda" else CPU_DEFAULTS)[ft.kind]
    opts.batch_size = opts.batch_size or d["batch_size"]
    opts.seq_len = opts.seq_len or min(d["seq_len"], max_seq_len)


def _check_resume_extras(run_dir: Path, ft: FinetuneOptions) -> None:
    f = run_dir / "config.json"
    if not f.is_file():
        return
    old = json.loads(f.read_text()).get("finetune", {})
    diffs = [f"{k}: {old.get(k)!r} -> {getattr(ft, k)!r}" for k in RESUME_DEFINING
             if k in old and old[k] != getattr(ft, k)]
    if diffs:
        raise FurnaceError(f"--resume {run_dir}: options differ from the saved run ({'; '.join(diffs)}); resume "
                           f"with the same options or start a new --out")


def _save_tokenizer(tok, run_dir: Path) -> Path:
    """OUT/tokenizer/{tokenizer.json, chat_template.json}: save_checkpoint copies both into each checkpoint.
    Written only once the data has been read, so bad input leaves OUT untouched."""
    d = run_dir / "tokenizer"
    tok.save(d)
    meta = {"format": "chatml", "source": "data/chat_template.py", "stop_tokens": list(STOP_TOKENS),
            "trained": "assistant replies (with <think> blocks) and their <|im_end|>", "jinja": JINJA_TEMPLATE}
    atomic_write_json(d / CHAT_TEMPLATE_FILE, meta)
    return d


def _setup(opts: TrainOptions, ft: FinetuneOptions, rt: Runtime):
    """-> (run_dir, resume checkpoint or None, init checkpoint, tokenizer, model on rt.device). Writes nothing."""
    if not opts.init:
        what = "a pretrained run, e.g. --init runs/tiny-stdlib-bpe4096" if ft.kind == "sft" else "an SFT run"
        raise FurnaceError(f"--init is required: the checkpoint or run folder to fine-tune ({what})")
    if opts.preset:
        raise FurnaceError(f"--preset {opts.preset}: fine-tuning takes the model's shape from --init; drop --preset")
    ft.check()
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
    _defaults(opts, ft, rt, load_config(init_ckpt).max_seq_len)
    name = f"{ft.kind}-{Path(opts.init).resolve().name}"
    if not opts.out:
        opts.out = str(latest_default_out(name) if opts.resume else default_out(name))
    run_dir = Path(opts.out)
    resume_ckpt = check_out_dir(run_dir, opts.to_dict(), opts.resume, RUN_DEFINING)
    if opts.resume:
        _check_resume_extras(run_dir, ft)
    tok = load_tokenizer(init_ckpt)
    model = build_model(opts, None, rt)
    ensure_chat_tokens(tok, model)
    check_seq_len(opts.seq_len, model.config, f"--init {init_ckpt}")
    return run_dir, resume_ckpt, init_ckpt, tok, model


def _read(arg: str, parse, build, bad: BadRecords) -> list:
    out = []
    for src in expand_data_arg(arg):
        for where, rec in iter_records(src, bad):
            try:
                out.append(build(parse(rec)))
            except FurnaceError as e:
                bad.report(where, str(e))
    return out


def _split(items: list, val_arg: str, read_val) -> tuple[list, list]:
    """Validation: --val-data when given, else every 20th item (at most 200) when there are >= 40."""
    if val_arg:
        return items, read_val(val_arg)
    if len(items) < 40:
        log.info(f"validation: only {len(items)} examples and no --val-data: no held-out set")
        return items, []
    k = max(20, len(items) // 200)
    return [x for i, x in enumerate(items) if i % k], [x for i, x in enumerate(items) if not i % k]


def _max_steps(opts: TrainOptions, rt: Runtime, units_per_epoch: int) -> None:
    if not opts.max_steps:
        per_step = opts.batch_size * opts.grad_accum * rt.world_size
        opts.max_steps = max(1, -(-DEFAULT_EPOCHS * units_per_epoch // per_step))


def _record(ft: FinetuneOptions, init_ckpt: Path, bad: BadRecords, n_train: int, n_val: int) -> dict:
    return {"finetune": asdict(ft), "init_checkpoint": str(init_ckpt), "chat_template": "chatml",
            "bad_records_skipped": bad.count, "train_examples": n_train, "val_examples": n_val}


# ---- SFT -------------------------------------------------------------------------------------------
def run_sft(opts: TrainOptions, ft: FinetuneOptions) -> dict:
    ft.kind = "sft"
    return with_runtime(_run_sft, opts, ft)


def read_sft(arg: str, tok, max_len: int, bad: BadRecords, truncate: bool = False) -> list:
    return _read(arg, sft_messages, lambda msgs: build_sft_example(tok, msgs, max_len, truncate), bad)


def _run_sft(opts: TrainOptions, ft: FinetuneOptions, rt: Runtime) -> dict:
    run_dir, resume_ckpt, init_ckpt, tok, model = _setup(opts, ft, rt)
    bad = BadRecords(skip=ft.skip_bad)
    examples = read_sft(opts.data, tok, opts.seq_len, bad, ft.truncate)
    train, val = _split(examples, ft.val_data, lambda a: read_sft(a, tok, opts.seq_len, bad, ft.truncate))
    log.info(bad.summary("data"))
    if not train:
        raise FurnaceError(f"--data {opts.data}: no usable training examples")
    if rt.is_main:
        _save_tokenizer(tok, run_dir)
    loader = PackedSFTLoader(train, opts.batch_size, opts.seq_len, tok.eos_id, seed=opts.seed, rank=rt.rank,
                             world_size=rt.world_size, device=rt.device)
    st = loader.stats()
    _max_steps(opts, rt, st["rows"])
    val_loader = (PackedSFTLoader(val, opts.batch_size, opts.seq_len, tok.eos_id, shuffle=False, device=rt.device)
                  if val else None)
    eval_batches = (min(val_loader.batches_per_epoch(), max(1, opts.eval_tokens // (opts.batch_size * opts.seq_len)))
                    if val_loader else 1)
    log.info(f"SFT: {len(train)} train / {len(val)} val examples; {st['rows']} packed rows of {opts.seq_len} per "
             f"epoch ({100 * st['fill']:.0f}% filled, {st['trained_per_row']:.0f} trained tokens per row); "
             f"batch {opts.batch_size}x{opts.seq_len}x{opts.grad_accum}x{rt.world_size}; {opts.max_steps} steps; "
             f"out {run_dir}")
    log.info("SFT: the loop's tokens and tokens/s count trained (assistant) tokens, the loss's normaliser")
    fpu = flops_per_token(model.config, opts.seq_len) * opts.seq_len / max(st["trained_per_row"], 1.0)
    summary = run_loop(opts, rt, model, run_dir, resume_ckpt, loader, val_loader, run_dir / "tokenizer",
                       seq_len=opts.seq_len, eval_batches=eval_batches, flops_per_unit=fpu,
                       run_record=_record(ft, init_ckpt, bad, len(train), len(val)),
                       loss_fn=lambda m, b: (m(b[0], b[1], z_loss=opts.z_loss, doc_ids=b[2])[1], {}))
    if rt.is_main:
        log.info(f"chat with it: python infer/chat.py --ckpt {run_dir}")
        log.info(f"then DPO: python sft/train_dpo.py --init {run_dir}")
    return summary


# ---- DPO -------------------------------------------------------------------------------------------
def run_dpo(opts: TrainOptions, ft: FinetuneOptions) -> dict:
    ft.kind = "dpo"
    return with_runtime(_run_dpo, opts, ft)


def read_pairs(arg: str, tok, max_len: int, bad: BadRecords, truncate: bool = False) -> list:
    def build(pair):
        return tuple(build_sft_example(tok, msgs, max_len, truncate, last_only=True) for msgs in pair)
    return _read(arg, dpo_messages, build, bad)


def checkpoint_key(init_ckpt: Path, tok, model, precision_name: str) -> str:
    """What the reference log-probs depend on besides the data: weights, tokenizer, shape, precision."""
    import hashlib
    h = hashlib.sha256()
    for part in (file_sha256(init_ckpt / "model.safetensors"), tok.sha256,
                 json.dumps(model.config.to_dict(), sort_keys=True), precision_name):
        h.update(part.encode())
    return h.hexdigest()


def _run_dpo(opts: TrainOptions, ft: FinetuneOptions, rt: Runtime) -> dict:
    run_dir, resume_ckpt, init_ckpt, tok, model = _setup(opts, ft, rt)
    bad = BadRecords(skip=ft.skip_bad)
    pairs = read_pairs(opts.data, tok, opts.seq_len, bad, ft.truncate)
    train, val = _split(pairs, ft.val_data, lambda a: read_pairs(a, tok, opts.seq_len, bad, ft.truncate))
    log.info(bad.summary("data"))
    if not train:
        raise FurnaceError(f"--data {opts.data}: no usable preference pairs")
    if rt.is_main:
        _save_tokenizer(tok, run_dir)
    pad = tok.eos_id
    cache = Path(ft.ref_cache or Path("runs") / "cache" / "dpo-ref")
    # The model is still the frozen --init model here (resume weights are loaded later, in run_loop).
    ref = cached_reference_logps(
        cache, checkpoint_key(init_ckpt, tok, model, rt.precision.name), train + val,
        lambda: reference_logps(model, train + val, opts.batch_size, pad, opts.seq_len, rt.device, rt.precision.autocast))
    ref_train, ref_val = ref[:len(train)], ref[len(train):]
    loader = PairLoader(train, ref_train, opts.batch_size, pad, opts.seq_len, seed=opts.seed, rank=rt.rank,
                        world_size=rt.world_size, device=rt.device)
    _max_steps(opts, rt, len(train))
    beta = ft.beta
    n_probe = min(len(train), 64)

    def eval_fn(trainer) -> dict:
        args = (beta, opts.batch_size, pad, opts.seq_len, rt.device, rt.precision.autocast)
        out = evaluate_pairs(trainer.model, train[:n_probe], ref_train[:n_probe], *args, prefix="train_")
        if val:
            out.update(evaluate_pairs(trainer.model, val, ref_val, *args, prefix="val_"))
        return out

    mean_len = sum(len(c[0]) + len(r[0]) for c, r in train) / len(train)
    fpu = flops_per_token(model.config, opts.seq_len) * mean_len
    log.info(f"DPO: {len(train)} train / {len(val)} held-out pairs, beta {beta}; batch {opts.batch_size} pairs x "
             f"{opts.grad_accum} x {rt.world_size}; {opts.max_steps} steps; out {run_dir}")
    log.info("DPO: the loop counts preference pairs (the loss unit: pair/s on the console; tokens and tokens_per_s in metrics.jsonl); loss starts at ln 2 = 0.6931")
    summary = run_loop(opts, rt, model, run_dir, resume_ckpt, loader, None, run_dir / "tokenizer",
                       seq_len=opts.seq_len, eval_batches=1, flops_per_unit=fpu, count_fn=count_pairs,
                       run_record=_record(ft, init_ckpt, bad, len(train), len(val)),
                       loss_fn=lambda m, b: dpo_step(m, b, beta), eval_fn=eval_fn, unit="pair")
    if rt.is_main:
        log.info(f"chat with it: python infer/chat.py --ckpt {run_dir}")
    return summary
