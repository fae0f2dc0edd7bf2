"""GGUF export checked by llama.cpp itself (llama-cpp-python): logits, greedy continuation, tokenizer, chat template."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from llama_cpp import GGML_TYPE_F32, Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from data import train_bpe
from data.chat_template import render
from infer import generate
from infer.gguf_file import permute_rotate_half, write_gguf
from model import GPT, FurnaceError, GPTConfig, get_preset, save
from test_infer import CORPUS, train_tiny  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    return train_tiny()


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["the quick brown fox jumps over the lazy dog", "hello world 123"] * 20, vocab_size=300)


def llama(path, n_ctx, **kw):
    """llama.cpp with an fp32 KV cache (its default, f16, alone moves logits by ~1e-2 on the trained model)."""
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=1, verbose=False,
                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, **kw)


def llama_logits(llm, ids) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))   # (T, V)


def random_model(cfg):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so a swapped or missing norm would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def small_cfg(**kw):
    base = dict(vocab_size=320, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=160, max_seq_len=256,
                rope_theta=10000.0, kernels="torch")
    return GPTConfig(**{**base, **kw})


def test_permutation_turns_rotate_half_into_adjacent_pairs():
    """Rotate-half RoPE on rows r equals adjacent-pair RoPE on the permuted rows (per head, for q and k)."""
    nh, hd, T = 3, 8, 5
    x = torch.randn(T, nh, hd)
    ang = torch.randn(T, 1, hd // 2)
    c, s = ang.cos(), ang.sin()
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    half = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)                  # ours / HF
    xp = permute_rotate_half(x.reshape(T, nh * hd).T, nh).T.reshape(T, nh, hd)
    a, b = xp[..., 0::2], xp[..., 1::2]
    pairs = torch.stack([a * c - b * s, b * c + a * s], -1).reshape(T, nh, hd)  # llama.cpp (GGML_ROPE_TYPE_NORM)
    unperm = permute_rotate_half(half.reshape(T, nh * hd).T, nh).T.reshape(T, nh, hd)
    assert torch.allclose(pairs, unperm, atol=1e-6)


@pytest.mark.parametrize("kw", [
    dict(),                                                                   # GQA, tied
    dict(n_kv_head=4, tie_embeddings=False, rope_scaling="ntk", rope_factor=4.0),
    dict(n_kv_head=1, rope_scaling="linear", rope_factor=2.0),                # MQA
    dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=64),
])
def test_f32_logits_match_llama_cpp(kw, tok, tmp_path):
    cfg = small_cfg(**kw)
    model = random_model(cfg)
    path = write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    ids = torch.randint(0, cfg.vocab_size, (200,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids[None])[0][0]
    theirs = llama_logits(llama(path, cfg.max_seq_len, logits_all=True), ids.tolist())
    assert (ours - theirs).abs().max().item() < 1e-3


def test_f32_logits_26m_shape_and_trained_tiny(trained, tok, tmp_path):
    cfg = get_preset("26m").replace(kernels="torch", max_seq_len=256)                # 8 x 512, 8/2 heads
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids[None])[0][0]
    path = write_gguf(model, tok, tmp_path / "26m.gguf", "f32")
    del model
    theirs = llama_logits(llama(path, 256, logits_all=True), ids.tolist())
    assert (ours - theirs).abs().max().item() < 1e-3

    model, ttok = trained
    ids = ttok.encode(CORPUS)[:100]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    path = write_gguf(model, ttok, tmp_path / "tiny.gguf", "f32")
    theirs = llama_logits(llama(path, 128, logits_all=True), ids)
    assert (ours - theirs).abs().max().item() < 1e-3


def greedy_llama(llm, prompt, n):
    import llama_cpp
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        out.append(int(np.argmax(last)))
        llm.eval([out[-1]])
    return out


def agreement(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


PROMPTS = ["the cat sat", "one two three", "red green", "monday tuesday", "the dog ran to", "the sun is", "a b c",
           "x y z", "the dog", "seven."]


def test_q8_0_greedy_continuation_agrees(trained, tmp_path):
    """Ours (fp32) vs llama.cpp Q8_0, 40 greedy tokens per prompt. Measured: 9 of 10 prompts agree on all 40; on
    "the dog ran to" they part at token 2, where our top-2 logit margin is 0.37 and Q8_0 (weights and, in llama.cpp,
    activations quantized per 32 values) moves logits by up to 0.29 (teacher-forced, below; F32 files: 6e-6)."""
    model, tok = trained
    path = write_gguf(model, tok, tmp_path / "q.gguf", "q8_0")
    assert path.stat().st_size < 0.4 * (4 * sum(p.numel() for p in model.parameters()))
    llm = llama(path, 128)
    agree = []
    for text in PROMPTS:
        prompt = tok.encode(text)
        ours = generate(model, prompt, 40)
        agree.append(agreement(ours, greedy_llama(llm, prompt, 40)))
    assert sum(a >= 30 for a in agree) >= 9, dict(zip(PROMPTS, agree))
    ids = tok.encode(CORPUS)[:100]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    theirs = llama_logits(llama(path, 128, logits_all=True), ids)
    assert (ours - theirs).abs().max().item() < 0.5


STRINGS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { x[i] = y[i] * 2; }  // C",
    "naïve café, 東京, Привет, emoji 🙂👍🏽 and math ∑∫√",
    "tabs\tand   spaces \n\n\n  trailing   \r\n end  ",
    "numbers 1234567 3.14159 -42 1e-5 ''' \"quoted\" it's we'll they've",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nhm\n</think>\nok<|im_end|><|endoftext|>",
]


def test_tokenizer_ids_equal_llama_cpp(trained, tmp_path):
    model, tok = trained
    path = write_gguf(model, tok, tmp_path / "v.gguf", "f16")
    llm = llama(path, 128, vocab_only=True)
    for s in STRINGS:
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok.encode(s), s
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == tok.encode_ordinary(s), s
        assert llm.detokenize(tok.encode(s), special=True).decode() == s


def test_chat_template_renders_our_prompt(trained, tmp_path):
    model, tok = trained
    path = write_gguf(model, tok, tmp_path / "c.gguf", "f16")
    llm = llama(path, 128, vocab_only=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "reasoning": "greet back"}, {"role": "user", "content": "?"}]
    # llama-cpp-python's chat completion renders the GGUF's Jinja template (with the generation prompt)
    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|endoftext|>",
                              bos_token="<|endoftext|>")
    assert fmt(messages=msgs).prompt == render(msgs, add_generation_prompt=True)
    # llama.cpp's own C++ template engine recognises it as ChatML (it has no think blocks)
    plain = [m for m in msgs if "reasoning" not in m]
    assert llama_cpp_chat(llm, plain) == render(plain, add_generation_prompt=True)
    # the EOT (end of chat turn) is <|im_end|>, the EOS <|endoftext|>
    assert llm.metadata["tokenizer.ggml.eot_token_id"] == str(tok.token_id("<|im_end|>"))
    assert llm.token_eos() == tok.token_id("<|endoftext|>")


def llama_cpp_chat(llm, msgs) -> str:
    import ctypes

    import llama_cpp
    tmpl = llm.metadata["tokenizer.chat_template"].encode()
    arr = (llama_cpp.llama_chat_message * len(msgs))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in msgs])
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(tmpl, arr, len(msgs), True, buf, len(buf))
    assert 0 < n <= len(buf)
    return buf.raw[:n].decode()


def test_refusals(tok, tmp_path):
    with pytest.raises(FurnaceError, match="qk_norm"):
        write_gguf(GPT(small_cfg(qk_norm=True)), tok, tmp_path / "a.gguf")
    unknown = GPT(small_cfg())
    unknown.config.rope_scaling = "longrope"          # a scaling model/rope.py might gain: never exported unmapped
    with pytest.raises(FurnaceError, match="RoPE scaling 'longrope'"):
        write_gguf(unknown, tok, tmp_path / "r.gguf")
    from tokenizers import normalizers, pre_tokenizers
    odd = train_bpe(["hello world"] * 5, vocab_size=280)
    odd.hf.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(FurnaceError, match="splits text"):
        write_gguf(GPT(small_cfg()), odd, tmp_path / "b.gguf")
    odd = train_bpe(["hello world"] * 5, vocab_size=280)
    odd.hf.normalizer = normalizers.NFKC()
    with pytest.raises(FurnaceError, match="normalizer"):
        write_gguf(GPT(small_cfg()), odd, tmp_path / "c.gguf")
    with pytest.raises(FurnaceError, match="no merges"):
        write_gguf(GPT(small_cfg()), train_bpe(["ab"], vocab_size=261), tmp_path / "n.gguf")
    with pytest.raises(FurnaceError, match="vocab_size=200"):
        write_gguf(GPT(small_cfg(vocab_size=200)), tok, tmp_path / "d.gguf")
    (tmp_path / "e.gguf").write_text("keep")
    with pytest.raises(FurnaceError, match="already exists"):
        write_gguf(GPT(small_cfg()), tok, tmp_path / "e.gguf")
    assert (tmp_path / "e.gguf").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.gguf"]        # no partial files left


def test_cli_writes_gguf_and_modelfile(trained, tmp_path):
    model, tok = trained
    ck = tmp_path / "ck"
    save(model, ck)
    cmd = [sys.executable, str(ROOT / "infer/export_gguf.py"), str(ck), str(tmp_path / "m.gguf"), "--type", "q8_0"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "tokenizer.json" in r.stderr.strip().splitlines()[-1]
    tok.save(ck)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    mf = (tmp_path / "m.Modelfile").read_text()
    assert mf.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in mf and "<|im_start|>{{ .Role }}" in mf
    r = subprocess.run(cmd, capture_output=True, text=True, cwd="/")                   # never overwrites
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    llm = llama(tmp_path / "m.gguf", 128)
    prompt = tok.encode("the cat sat")
    assert agreement(generate(model, prompt, 30), greedy_llama(llm, prompt, 30)) >= 30
