"""HF export: transformers' LlamaForCausalLM loaded from our folder gives our logits (fp32, 1e-4)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import train_bpe
from infer.export_hf import export_hf
from model import GPT, FurnaceError, GPTConfig, save

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def small_cfg(**kw):
    base = dict(vocab_size=320, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=160, max_seq_len=256,
                rope_theta=10000.0, kernels="torch")
    base.update(kw)
    return GPTConfig(**base)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["the quick brown fox jumps over the lazy dog", "hello world 123"] * 20, vocab_size=300)


def ours_and_hf(cfg, tmp_path, tok=None):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so a swapped norm would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    out = export_hf(model, tmp_path / "hf", tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    return model, hf, out


@pytest.mark.parametrize("kw", [
    dict(),                                                     # GQA, tied
    dict(n_kv_head=4, tie_embeddings=False),                    # full MHA, untied
    dict(n_kv_head=1, rope_scaling="linear", rope_factor=2.0),  # MQA + linear RoPE scaling
    dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=64),
    dict(rope_scaling="ntk", rope_factor=4.0, tie_embeddings=False),
])
def test_logits_match_transformers(kw, tmp_path):
    cfg = small_cfg(**kw)
    model, hf, _ = ours_and_hf(cfg, tmp_path)
    idx = torch.randint(0, cfg.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings


def test_folder_contents_and_greedy_generate(tok, tmp_path):
    cfg = small_cfg()
    model, hf, out = ours_and_hf(cfg, tmp_path, tok)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "hello"}]
    from data.chat_template import encode_chat
    assert hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False) == \
        encode_chat(tok, msgs, add_generation_prompt=True)
    from infer import generate
    prompt = tok.encode("the quick brown")
    ours = generate(model, prompt, 12)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


def test_refusals(tmp_path):
    model = GPT(small_cfg(qk_norm=True))
    with pytest.raises(FurnaceError, match="qk_norm"):
        export_hf(model, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(FurnaceError, match="not empty"):
        export_hf(GPT(small_cfg()), tmp_path / "b")
    assert (tmp_path / "b" / "keep.txt").read_text() == "x"
    assert not (tmp_path / "a").exists()


def test_cli_roundtrip_and_missing_tokenizer(tok, tmp_path):
    ck = tmp_path / "ck"
    save(GPT(small_cfg()), ck)
    r = subprocess.run([sys.executable, str(ROOT / "infer/export_hf.py"), str(ck), str(tmp_path / "o1")],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "tokenizer.json" in r.stderr
    tok.save(ck)
    r = subprocess.run([sys.executable, str(ROOT / "infer/export_hf.py"), str(ck), str(tmp_path / "o2")],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o2" / "model.safetensors").is_file()
