"""The one chat template: segments/render/encode agree, trainable spans, HF Jinja parity, token additions."""
import pytest
import torch

from data import train_bpe
from data.chat_template import (JINJA_TEMPLATE, STOP_TOKENS, encode_chat, encode_chat_segments,
                                ensure_chat_tokens, render, segments)
from model import GPT, FurnaceError, GPTConfig

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "5", "reasoning": "2 + 3 = 5"},
    {"role": "user", "content": "Héllo, wörld? 😀"},
    {"role": "assistant", "content": "Hi!\nBye."},
]


@pytest.fixture(scope="module")
def tok():
    texts = ["Add 2 and 3. The answer is 5.", "Hello world, you are terse.", "def f(x):\n    return x"] * 20
    return train_bpe(texts, vocab_size=300)


def test_render_exact_text():
    expected = ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n2 + 3 = 5\n</think>\n5<|im_end|>\n"
                "<|im_start|>user\nHéllo, wörld? 😀<|im_end|>\n"
                "<|im_start|>assistant\nHi!\nBye.<|im_end|>\n")
    assert render(CONV) == expected
    assert render(CONV[:2], add_generation_prompt=True).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "".join(t for t, _ in segments(CONV, True)) == render(CONV, True)


def test_trainable_segments_are_assistant_replies():
    trained = [t for t, flag in segments(CONV) if flag]
    assert trained == ["<think>\n2 + 3 = 5\n</think>\n5<|im_end|>", "Hi!\nBye.<|im_end|>"]


def test_encode_roundtrip_and_prefix_property(tok):
    ids = encode_chat(tok, CONV)
    assert tok.decode(ids) == render(CONV)
    # The inference prompt for turn k is, token for token, a prefix of the training sequence.
    for k in (2, 4):
        prompt = encode_chat(tok, CONV[:k], add_generation_prompt=True)
        assert ids[:len(prompt)] == prompt
    # Trainable spans decode to exactly the assistant replies with their end token.
    trained = [tok.decode(s) for s, flag in encode_chat_segments(tok, CONV) if flag]
    assert trained == ["<think>\n2 + 3 = 5\n</think>\n5<|im_end|>", "Hi!\nBye.<|im_end|>"]
    im_end = tok.token_id("<|im_end|>")
    assert ids.count(im_end) == len(CONV)
    assert STOP_TOKENS[0] == "<|im_end|>"


def test_jinja_template_matches_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    hf.chat_template = JINJA_TEMPLATE
    for conv, gen in ((CONV, False), (CONV[:4], True), (CONV[1:2], True)):
        assert hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen) == render(conv, gen)


@pytest.mark.parametrize("bad, msg", [
    ([{"role": "robot", "content": "x"}], "role 'robot'"),
    ([{"role": "user"}], "'content' is missing"),
    ([{"role": "user", "content": 3}], "not a string"),
    ([{"role": "user", "content": "x", "reasoning": "y"}], "only assistant"),
    ("hello", "expected a list"),
])
def test_bad_messages(bad, msg):
    with pytest.raises(FurnaceError, match=msg):
        render(bad)


def test_ensure_chat_tokens_adds_and_resizes():
    tok = train_bpe(["plain text only"] * 10, vocab_size=260, special_tokens=["<|endoftext|>"])
    V0 = tok.vocab_size
    cfg = GPTConfig(vocab_size=V0, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, ffn_hidden=64, max_seq_len=128,
                    tie_embeddings=False)
    model = GPT(cfg)
    old_head = model.lm_head.weight.detach().clone()
    assert ensure_chat_tokens(tok, model)
    assert tok.vocab_size == V0 + 4 == model.config.vocab_size
    assert model.embed.weight.shape[0] == V0 + 4 and model.lm_head.weight.shape[0] == V0 + 4
    assert torch.equal(model.lm_head.weight[:V0], old_head)
    assert torch.allclose(model.lm_head.weight[V0], old_head.mean(0))
    ids = encode_chat(tok, CONV[:2], add_generation_prompt=True)
    logits, _ = model(torch.tensor([ids]))
    assert logits.shape[-1] == V0 + 4
    assert not ensure_chat_tokens(tok, model)  # nothing left to add
