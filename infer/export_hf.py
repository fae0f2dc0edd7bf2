"""Export a Furnace checkpoint as a Hugging Face LlamaForCausalLM folder (transformers, vLLM, llama.cpp).

    python infer/export_hf.py runs/sft/checkpoints/step_00001000 exported/
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('exported')"

Our block is Llama's: RMSNorm (fp32 statistics) -> GQA attention with rotate-half RoPE -> RMSNorm -> SwiGLU,
no biases, so weights map one to one (no q/k permutation: HF Llama also rotates halves). RoPE scaling:
  linear -> rope_type "linear" (same factor); yarn -> rope_type "yarn" (factor, original context, beta 32/1,
  attention factor 0.1 ln s + 1); ntk -> folded into rope_theta (theta * s^(d/(d-2)), exact).
qk_norm has no Llama equivalent and is refused.

The folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the chat template),
generation_config.json (stops at <|im_end|> and <|endoftext|>), special_tokens_map.json.
A LoRA adapter run (sft/train_sft.py --lora-rank R) exports as OUT/base (its base, as above) and OUT/adapter
(a PEFT folder: adapter_config.json + adapter_model.safetensors): `PeftModel.from_pretrained(base, OUT/adapter)`.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from kernels.common import FurnaceError, run_cli  # noqa: E402

if TYPE_CHECKING:
    import torch

    from model.config import GPTConfig
    from model.gpt import GPT


_RENAME = {  # ours (inside layers.{i}.) -> HF (inside model.layers.{i}.)
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype -> torch / HF dtype name


def hf_rope(cfg: GPTConfig) -> tuple[float, dict | None]:
    """(rope_theta, legacy rope_scaling dict or None)."""
    s = cfg.rope_factor
    if cfg.rope_scaling == "none" or s == 1.0:
        return cfg.rope_theta, None
    if cfg.rope_scaling == "ntk":
        d = cfg.head_dim
        return cfg.rope_theta * s ** (d / (d - 2)), None
    if cfg.rope_scaling == "linear":
        return cfg.rope_theta, {"rope_type": "linear", "factor": s}
    return cfg.rope_theta, {"rope_type": "yarn", "factor": s,
                            "original_max_position_embeddings": cfg.rope_original_max_seq_len or cfg.max_seq_len,
                            "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 0.1 * math.log(s) + 1.0}


def hf_config(cfg: GPTConfig, dtype_name: str = "float32", eos_id: int | None = None,
              bos_id: int | None = None) -> dict:
    if cfg.qk_norm:
        raise FurnaceError("export: this model uses qk_norm (RMSNorm on q and k), which LlamaForCausalLM does not "
                           "have; exporting it as Llama would silently change its outputs. Qwen3-style export is "
                           "not implemented: export a model trained without --qk-norm")
    theta, scaling = hf_rope(cfg)
    rope_parameters = {"rope_type": "default", "rope_theta": theta}
    if scaling:
        rope_parameters = {**scaling, "rope_theta": theta}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
        # Both spellings: rope_theta/rope_scaling (transformers < 5, vLLM, llama.cpp's converter) and
        # rope_parameters (transformers >= 5).
        "rope_theta": theta, "rope_scaling": scaling, "rope_parameters": rope_parameters,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dtype_name, "dtype": dtype_name,
    }


def renamed_weights(model: GPT, top: dict[str, str], block_prefix: str, block: dict[str, str], target: str):
    """(our name inside layers.{i}. or the top-level name, the target's name, tensor) for every weight; one
    FurnaceError naming `target` for a weight it has no counterpart for. Shared by the HF and GGUF exports."""
    from model.io import clean_state_dict
    for name, t in clean_state_dict(model).items():
        if name in top:
            yield name, top[name], t
        elif name.startswith("layers.") and name.split(".", 2)[2] in block:
            _, i, rest = name.split(".", 2)
            yield rest, f"{block_prefix}{i}.{block[rest]}", t
        else:
            raise FurnaceError(f"export: parameter {name} has no {target} counterpart")


def hf_state_dict(model: GPT, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    import torch
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}
    return {key: t.detach().to("cpu", dtype or torch.float32).contiguous()
            for _, key, t in renamed_weights(model, top, "model.layers.", _RENAME, "LlamaForCausalLM")}


def tokenizer_files(tokenizer, cfg: GPTConfig) -> dict[str, dict]:
    """tokenizer_config.json, special_tokens_map.json and generation_config.json contents."""
    from data.chat_template import EOS, IM_END, JINJA_TEMPLATE, STOP_TOKENS
    eos = tokenizer.token_id(EOS)
    im_end = tokenizer.token_id(IM_END)
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for s, i in tokenizer.special_ids.items()}
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
        "bos_token": None, "eos_token": EOS if eos is not None else None, "pad_token": EOS if eos is not None else None,
        "unk_token": None, "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
        "added_tokens_decoder": added,
    }
    if im_end is not None:
        tok_cfg["chat_template"] = JINJA_TEMPLATE
    stops = [i for i in (tokenizer.token_id(t) for t in STOP_TOKENS) if i is not None]
    gen = {"_from_model_config": False, "do_sample": False, "eos_token_id": stops or None, "pad_token_id": eos,
           "max_length": cfg.max_seq_len}
    special_map = {"eos_token": tok_cfg["eos_token"], "pad_token": tok_cfg["pad_token"]}
    return {"tokenizer_config.json": tok_cfg, "generation_config.json": gen, "special_tokens_map.json": special_map}


def export_hf(model: GPT, out: str | os.PathLike, tokenizer=None, dtype: str = "fp32") -> Path:
    """Write the HF folder. Refuses an existing non-empty `out`; writes into a temporary sibling folder and
    renames it at the end, so an interrupted export leaves nothing half-written under `out`."""
    import torch
    from safetensors.torch import save_file

    from data.chat_template import EOS
    from model.fileio import atomic_dir
    if dtype not in DTYPES:
        raise FurnaceError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    dtype_name = DTYPES[dtype]
    torch_dtype = getattr(torch, dtype_name)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FurnaceError(f"export: output {out} already exists and is not empty; choose a new folder "
                           f"(existing files are never overwritten)")
    cfg = model.config
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise FurnaceError(f"export: tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model has "
                           f"vocab_size={cfg.vocab_size}; pass the tokenizer the model was trained with")
    eos = tokenizer.token_id(EOS) if tokenizer is not None else None
    conf = hf_config(cfg, dtype_name, eos_id=eos)
    with atomic_dir(out) as tmp:  # `out` is absent or empty (checked above)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        save_file(hf_state_dict(model, torch_dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
            for name, obj in tokenizer_files(tokenizer, cfg).items():
                (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    return out


def export_peft_adapter(model: GPT, out: str | os.PathLike, base_dir: str | os.PathLike) -> Path:
    """A LoRA-adapted model's adapters as a PEFT folder (adapter_config.json + adapter_model.safetensors) for
    the LlamaForCausalLM export of its base in `base_dir`: PeftModel.from_pretrained(llama, out) gives our
    adapted model's logits. Keys: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ..."""
    import torch
    from safetensors.torch import save_file

    from model.fileio import atomic_dir
    from model.lora import TARGETS, adapter_state_dict
    cfg = model.lora
    out = Path(out)
    tensors = {}
    for name, t in adapter_state_dict(model).items():       # layers.{i}.attn.q_proj.lora_A
        _, i, rest = name.split(".", 2)
        module, ab = rest.rsplit(".", 1)                      # attn.q_proj, lora_A
        hf = _RENAME[module + ".weight"][:-len(".weight")]    # self_attn.q_proj
        tensors[f"base_model.model.model.layers.{i}.{hf}.{ab}.weight"] = t.detach().to("cpu", torch.float32).contiguous()
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(base_dir).resolve()),
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "target_modules": [TARGETS[t].split(".")[1] for t in cfg.targets], "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "modules_to_save": None, "inference_mode": True}
    with atomic_dir(out) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def export_adapter_run(ckpt, out: str | os.PathLike, tokenizer=None, dtype: str = "fp32") -> tuple[Path, Path]:
    """An adapter checkpoint -> OUT/base (the base as LlamaForCausalLM) and OUT/adapter (PEFT LoRA folder)."""
    from model.io import load
    from model.lora import check_base, load_adapted, read_adapter_config
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FurnaceError(f"export: output {out} already exists and is not empty; choose a new folder "
                           f"(existing files are never overwritten)")
    base = load(check_base(read_adapter_config(ckpt), ckpt))
    adapted = load_adapted(ckpt)
    base_dir = export_hf(base, out / "base", tokenizer, dtype)
    return base_dir, export_peft_adapter(adapted, out / "adapter", base_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint folder or training run folder (newest checkpoint)")
    p.add_argument("out", help="new output folder (must not exist or be empty)")
    p.add_argument("--tokenizer", help="tokenizer.json or folder holding it (default: the checkpoint's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weight dtype in model.safetensors; default: fp32")
    args = p.parse_args(argv)
    from infer.runtime import load_tokenizer_for
    from model.io import load, resolve_checkpoint
    from model.lora import is_adapter_checkpoint
    tok = load_tokenizer_for(args.ckpt, args.tokenizer)
    ckpt = resolve_checkpoint(args.ckpt)
    if is_adapter_checkpoint(ckpt):
        base_dir, adapter_dir = export_adapter_run(ckpt, args.out, tok, args.dtype)
        logging.getLogger("furnace").info(f"exported LoRA run {args.ckpt}: base -> {base_dir} (LlamaForCausalLM, "
                                          f"{args.dtype}), adapter -> {adapter_dir} (PEFT)")
        return 0
    model = load(args.ckpt)
    out = export_hf(model, args.out, tok, args.dtype)
    logging.getLogger("furnace").info(f"exported {args.ckpt} -> {out} (LlamaForCausalLM, {args.dtype})")
    return 0


if __name__ == "__main__":
    run_cli(main)
