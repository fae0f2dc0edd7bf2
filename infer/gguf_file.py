"""A Furnace model + tokenizer as a llama.cpp GGUF file (architecture `llama`), written with the `gguf` package.

Used by infer/export_gguf.py (the command) and bench/generate.py (the llama.cpp rows).

Weights. Our block is Llama's (see infer/export_hf.py), so tensors map one to one, except for RoPE's layout:
we rotate halves (dim i pairs with i + head_dim/2, as Hugging Face Llama) and llama.cpp rotates adjacent pairs
(2i with 2i+1). Permuting each head's q and k rows to [0, h, 1, h+1, ...] (h = head_dim/2) makes the two the
same; q.k is unchanged because q and k get the same permutation (llama.cpp's convert_hf_to_gguf.py,
LlamaModel.permute). A tied LM head is stored once: llama.cpp uses token_embd when `output` is absent.
Types: f32, f16 or q8_0 for the matrices (q8_0 quantised here by gguf.quants, bit-exact with ggml's); norm
weights stay f32, as llama.cpp's converter does. A matrix whose rows are not a multiple of 32 cannot be q8_0
and is written f16 (said once).

Tokenizer. `tokenizer.ggml.model = gpt2` (byte-level BPE) with every token string, its type (control for our
special tokens, user-defined for other added tokens, unused for the [PADi] rows padding the model's vocabulary
beyond the tokenizer's), the merges, and `tokenizer.ggml.pre = gpt-2`: Furnace's tokenizers split text with
HF ByteLevel(use_regex=True), which is GPT-2's regex (data/tokenizer.py GPT2_PATTERN), and llama.cpp's
"gpt-2" pre-tokenizer is that regex (its unmatched whitespace tail becomes a piece of its own, as the pattern's
final `\\s+` makes it here); "default" or "llama3" would split digits, spaces and punctuation differently. A
tokenizer this cannot express (another model type, a normalizer, another pre-tokenizer, missing byte tokens,
stripping added tokens) is refused, never written approximately. BOS = EOS = pad = <|endoftext|>, and no BOS
is added (we train without one); EOT = <|im_end|> when present, so llama.cpp stops a chat turn there.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from data.chat_template import EOS, IM_END, IM_START, JINJA_TEMPLATE
from data.tokenizer import _bytes_to_unicode
from infer.export_hf import hf_rope, renamed_weights
from kernels.common import FurnaceError
from model.fileio import atomic_path

log = logging.getLogger("furnace")

TYPES = ("f32", "f16", "q8_0")
# llama.cpp's linear and yarn (beta 32/1, attention factor 0.1 ln s + 1) compute our tables; ntk is folded into
# the base. A scaling added to model/rope.py later is refused until it is mapped and tested here.
ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")
_BLOCK = {  # ours (inside layers.{i}.) -> llama.cpp (inside blk.{i}.)
    "attn_norm.weight": "attn_norm.weight", "mlp_norm.weight": "ffn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight", "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight", "attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute_rotate_half(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows from rotate-half order to llama.cpp's adjacent-pair order, per head."""
    rows, cols = w.shape                                                # (n_head * head_dim, n_embd)
    return (w.reshape(n_head, 2, rows // n_head // 2, cols)             # (nh, 2, hd/2, C): halves
            .swapaxes(1, 2)                                             # (nh, hd/2, 2, C): pairs
            .reshape(rows, cols))


def gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, fp32 tensor) in file order."""
    cfg = model.config
    top = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    out = []
    for rest, key, t in renamed_weights(model, top, "blk.", _BLOCK, "llama.cpp"):
        t = t.detach().to("cpu", torch.float32)
        if rest == "attn.q_proj.weight":
            t = permute_rotate_half(t, cfg.n_head)
        elif rest == "attn.k_proj.weight":
            t = permute_rotate_half(t, cfg.n_kv_head)
        out.append((key, t.contiguous()))
    return out


def _check_model(cfg) -> None:
    if cfg.qk_norm:
        raise FurnaceError("GGUF export: this model uses qk_norm (RMSNorm on q and k), which llama.cpp's llama "
                           "architecture does not have; the file would load and answer wrong. Export a model "
                           "trained without --qk-norm")
    if cfg.rope_scaling not in ROPE_SCALINGS:
        raise FurnaceError(f"GGUF export: RoPE scaling {cfg.rope_scaling!r} has no llama.cpp equivalent; "
                           f"expected one of {', '.join(ROPE_SCALINGS)}")


def tokenizer_vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for a gpt2-model GGUF vocabulary of `n_vocab` entries. Refuses what
    llama.cpp's gpt2 tokenizer with the gpt-2 pre-tokenizer would split differently."""
    from gguf import TokenType

    src = tokenizer.source
    j = json.loads(tokenizer.hf.to_str())
    m, pre = j.get("model") or {}, j.get("pre_tokenizer") or {}

    def refuse(what):
        raise FurnaceError(f"GGUF export: tokenizer {src} {what}; llama.cpp's byte-level BPE (gpt2 model, gpt-2 "
                           f"pre-tokenizer) would tokenize differently. Export a model trained with a Furnace "
                           f"tokenizer (data/prepare.py: train:N or gpt2)")

    if m.get("type") != "BPE":
        refuse(f"is a {m.get('type')} model, not BPE")
    if j.get("normalizer") is not None:
        refuse(f"has a normalizer ({j['normalizer'].get('type')})")
    if (pre.get("type"), pre.get("add_prefix_space"), pre.get("use_regex", True)) != ("ByteLevel", False, True):
        refuse(f"splits text with {json.dumps(pre)[:120]}, not ByteLevel(add_prefix_space=False, use_regex=True)")
    if (j.get("decoder") or {}).get("type") != "ByteLevel":
        refuse("does not decode byte-level")
    if m.get("dropout") or m.get("continuing_subword_prefix") or m.get("end_of_word_suffix") \
            or m.get("byte_fallback") or m.get("ignore_merges"):
        refuse("uses BPE options (dropout, subword prefix/suffix, byte fallback or ignore_merges)")
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)                # token -> id
    missing = [c for c in _bytes_to_unicode().values() if c not in vocab]
    if missing:
        refuse(f"lacks {len(missing)} of the 256 byte tokens (e.g. {missing[0]!r})")
    added = {t["id"]: t for t in j.get("added_tokens", [])}
    for t in added.values():
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            refuse(f"strips or word-matches its added token {t['content']!r}")
    V = tokenizer.vocab_size
    if V > n_vocab:
        raise FurnaceError(f"GGUF export: tokenizer {src} has {V} tokens but the model has vocab_size={n_vocab}; "
                           f"pass the tokenizer the model was trained with")
    by_id = {i: s for s, i in vocab.items()}
    if sorted(by_id) != list(range(V)):
        refuse("has gaps in its token ids")
    tokens, types = [], []
    for i in range(n_vocab):
        if i >= V:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i]["content"])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [mg if isinstance(mg, str) else " ".join(mg) for mg in m.get("merges", [])]
    if not merges:
        refuse("has no merges (llama.cpp will not load a BPE vocabulary without them)")
    return tokens, [int(t) for t in types], merges


def write_gguf(model, tokenizer, out: str | os.PathLike, qtype: str = "f32", name: str = "furnace") -> Path:
    """Write `out` (a new file): written to a temporary sibling and renamed at the end, so an interrupted export
    leaves nothing under `out`."""
    import gguf

    if qtype not in TYPES:
        raise FurnaceError(f"--type {qtype!r}: expected one of {', '.join(TYPES)}")
    out = Path(out)
    if out.exists():
        raise FurnaceError(f"GGUF export: {out} already exists; choose a new file name (existing files are never "
                           f"overwritten)")
    cfg = model.config
    _check_model(cfg)
    tokens, types, merges = tokenizer_vocab(tokenizer, cfg.vocab_size)
    theta, scaling = hf_rope(cfg)
    Q = gguf.GGMLQuantizationType
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]

    with atomic_path(out) as tmp:  # the one atomic write: nothing under `out` until complete; disk full = one line
        w = gguf.GGUFWriter(str(tmp), "llama")
        try:
            w.add_name(name)
            w.add_file_type(int(ftype))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            w.add_context_length(cfg.max_seq_len)
            w.add_embedding_length(cfg.n_embd)
            w.add_block_count(cfg.n_layer)
            w.add_feed_forward_length(cfg.ffn_hidden)
            w.add_head_count(cfg.n_head)
            w.add_head_count_kv(cfg.n_kv_head)
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_rope_freq_base(theta)                          # ntk: folded into the base (exact)
            w.add_layer_norm_rms_eps(cfg.norm_eps)
            w.add_vocab_size(cfg.vocab_size)
            if scaling is not None:
                w.add_rope_scaling_type(gguf.RopeScalingType(scaling["rope_type"]))
                w.add_rope_scaling_factor(scaling["factor"])
                if scaling["rope_type"] == "yarn":
                    w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])

            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre("gpt-2")
            w.add_token_list(tokens)
            w.add_token_types(types)
            w.add_token_merges(merges)
            eos = tokenizer.token_id(EOS)
            if eos is not None:
                w.add_bos_token_id(eos)
                w.add_eos_token_id(eos)
                w.add_pad_token_id(eos)
            w.add_add_bos_token(False)
            w.add_add_eos_token(False)
            im_end = tokenizer.token_id(IM_END)
            if im_end is not None:
                w.add_eot_token_id(im_end)
                if tokenizer.token_id(IM_START) is not None:
                    w.add_chat_template(JINJA_TEMPLATE)

            fell_back = []
            for key, t in gguf_tensors(model):
                a = t.numpy()
                if a.ndim == 1 or qtype == "f32":
                    w.add_tensor(key, a)
                elif qtype == "q8_0" and a.shape[-1] % 32 == 0:
                    w.add_tensor(key, gguf.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
                else:
                    if qtype == "q8_0":
                        fell_back.append(key)
                    w.add_tensor(key, a.astype(np.float16))
            if fell_back:
                log.info(f"GGUF export: {len(fell_back)} matrices ({fell_back[0]}...) have rows that are not a multiple "
                         f"of 32, which q8_0 needs: written f16")
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return out


def modelfile_text(gguf_name: str, tokenizer, context: int) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` lying beside it: the ChatML template of
    data/chat_template.py (without think blocks) and its stop tokens; plain completion without chat tokens."""
    lines = [f"FROM ./{gguf_name}", f"PARAMETER num_ctx {context}"]
    if tokenizer.token_id(IM_START) is not None and tokenizer.token_id(IM_END) is not None:
        lines.append('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                     '{{ end }}<|im_start|>assistant\n"""')
        lines.append(f'PARAMETER stop "{IM_END}"')
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    if tokenizer.token_id(EOS) is not None:
        lines.append(f'PARAMETER stop "{EOS}"')
    return "\n".join(lines) + "\n"
