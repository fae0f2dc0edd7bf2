"""infer library: KV-cache generation, sampling filters, int8/bf16 quality on a trained tiny model, sessions."""
import copy

import pytest
import torch

from data import train_bpe
from infer import ChatSession, SamplingParams, StreamDecoder, filter_logits, generate, int8_op, next_token, quantize
from infer.quant import Int8Linear, quantize_rows
from infer.sampling import apply_repetition_penalty, check_sampling
from model import GPT, FurnaceError, GPTConfig

INT8_KERNELS = (*int8_op.native_isas(), "fbgemm")   # every int8 matmul path this CPU runs (ours, then FBGEMM)
CORPUS = ("the cat sat on the mat. one two three four five six seven. the dog ran to the park. "
          "red green blue yellow. a b c d e f g. the sun is hot. monday tuesday wednesday thursday. x y z.\n")


def train_tiny(steps: int = 80, seed: int = 0):
    """A 2-layer model trained for `steps` AdamW steps on a repetitive text: it has real structure (its
    greedy continuation reproduces the text), unlike random weights. ~5 s on 2 cores. -> (model, tokenizer)"""
    tok = train_bpe([CORPUS] * 50, vocab_size=300)
    ids = torch.tensor(tok.encode(CORPUS * 40))
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=192,
                    max_seq_len=128, kernels="torch")
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    T, B = 48, 16
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ix = torch.randint(0, len(ids) - T - 1, (B,), generator=g)
        x = torch.stack([ids[i:i + T] for i in ix])                      # (B, T)
        y = torch.stack([ids[i + 1:i + T + 1] for i in ix])
        _, loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    return train_tiny()


def random_model(sharp: bool = True, **kw):
    base = dict(vocab_size=97, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128, max_seq_len=96,
                kernels="torch")
    base.update(kw)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**base)).eval()
    if sharp:
        with torch.no_grad():  # larger logits so greedy choices are not near-ties
            model.lm_head.weight.mul_(8)
    return model


# ---- generation -------------------------------------------------------------------------------
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_greedy_cache_equals_recompute(n_kv_head):
    model = random_model(n_kv_head=n_kv_head)
    prompt = torch.randint(0, 97, (17,), generator=torch.Generator().manual_seed(3)).tolist()
    with_cache = generate(model, prompt, 40)
    without = generate(model, prompt, 40, use_cache=False)
    assert len(with_cache) == 40 and with_cache == without
    # Independent reference: argmax of a full forward pass, token by token.
    seq = list(prompt)
    for _ in range(40):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert seq[len(prompt):] == with_cache


def test_cache_prefix_reuse_and_stops():
    model = random_model()
    prompt = list(range(1, 30))
    ref = generate(model, prompt, 10)
    cache = model.new_cache(1, model.config.max_seq_len)
    generate(model, prompt[:20] + [5, 6, 7], 3, cache=cache)        # fills the cache with another continuation
    cache.pos = 20                                                    # only the shared 20-token prefix is valid
    assert generate(model, prompt, 10, cache=cache) == ref
    stop = ref[3]
    out = generate(model, prompt, 10, stop_ids=[stop])
    assert out == ref[:ref.index(stop) + 1]


def test_context_full_and_long_prompt():
    model = random_model()
    T = model.config.max_seq_len
    out = generate(model, list(range(T - 5)), 50)
    assert len(out) == 5                                              # stops when the context is full
    long = list(range(1, 90)) * 2                                     # 178 > 96 positions: left-truncated
    assert generate(model, long, 4) == generate(model, long[-(T - 1):], 4)


def test_seeded_sampling_reproducible():
    model = random_model(sharp=False)
    a = generate(model, [1, 2, 3], 20, temperature=1.0, top_k=20, seed=7)
    b = generate(model, [1, 2, 3], 20, temperature=1.0, top_k=20, seed=7)
    c = generate(model, [1, 2, 3], 20, temperature=1.0, top_k=20, seed=8)
    assert a == b and a != c


# ---- sampling ---------------------------------------------------------------------------------
def draws(logits, params, n=3000):
    g = torch.Generator().manual_seed(0)
    return [next_token(logits, params, generator=g) for _ in range(n)]


def test_top_k_never_leaves_the_top_k():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1)) * 2
    allowed = set(torch.topk(logits, 5).indices.tolist())
    got = draws(logits, SamplingParams(temperature=1.5, top_k=5))
    assert set(got) == allowed                                         # only and all of the top 5


def test_top_p_never_leaves_the_nucleus_and_matches_probabilities():
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    p = torch.softmax(logits, 0)
    # Nucleus by hand: smallest prefix of the sorted tokens whose mass reaches 0.8.
    cum, nucleus = 0.0, []
    for i in torch.argsort(p, descending=True).tolist():
        nucleus.append(i)
        cum += p[i].item()
        if cum >= 0.8:
            break
    got = draws(logits, SamplingParams(temperature=1.0, top_p=0.8), n=4000)
    assert set(got) == set(nucleus)
    renorm = p[nucleus] / p[nucleus].sum()
    freq = torch.tensor([got.count(i) / len(got) for i in nucleus])
    assert (freq - renorm).abs().max() < 0.03
    # top_k and top_p together: the intersection.
    got = draws(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.95), n=1000)
    assert set(got) == {0, 1}


def test_filter_keeps_best_token_and_greedy_ignores_filters():
    logits = torch.tensor([0.0, 10.0, 1.0])
    assert torch.isfinite(filter_logits(logits, top_p=1e-6)).tolist() == [False, True, False]
    assert next_token(logits, SamplingParams(temperature=0.0, top_k=1)) == 1


def test_repetition_penalty_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]
    assert next_token(torch.tensor([3.0, 2.9]), SamplingParams(repetition_penalty=1.5), seen=torch.tensor([0])) == 1


@pytest.mark.parametrize("kw, flag", [
    (dict(temperature=-1.0), "--temperature"), (dict(temperature=float("nan")), "--temperature"),
    (dict(top_k=0), "--top-k"), (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p"),
    (dict(repetition_penalty=0.0), "--repetition-penalty"),
])
def test_invalid_sampling_values(kw, flag):
    with pytest.raises(FurnaceError, match=flag):
        check_sampling(**kw)


# ---- precision --------------------------------------------------------------------------------
def test_int8_linear_matches_dequantized_reference():
    torch.manual_seed(0)
    w, x = torch.randn(96, 64) * 0.05, torch.randn(5, 64)
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    deq = q.float() * s[:, None]
    assert (deq - w).abs().max() <= s.max() / 2 + 1e-7                 # rounding error <= half a step
    ref = x @ deq.T
    # The CPU kernels also quantize activations (ours to int8 per row, FBGEMM to uint8 per call): error small
    # relative to |y|.
    for kernel in INT8_KERNELS:
        y = Int8Linear(w, backend=kernel)(x)
        assert ((y - ref).norm() / ref.norm()).item() < 0.02, kernel
    assert ((Int8Linear(w, backend="dequant")(x) - ref).abs().max()).item() < 1e-5


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_int8_and_bf16_keep_the_trained_models_greedy_continuation(trained, kernel, monkeypatch):
    monkeypatch.setattr("infer.quant.cpu_int8_backend", lambda: kernel)   # what FURNACE_INT8_KERNEL forces
    model, tok = trained
    ids = torch.tensor([tok.encode(CORPUS * 2)[:120]])
    with torch.no_grad():
        ref = model(ids)[0].argmax(-1)                                   # (1, T)
    prompt = tok.encode("the dog ran to the")
    greedy = generate(model, prompt, 40)
    assert tok.decode(greedy).startswith(" park. red green blue")       # it did learn the text
    for mode, min_agree in (("int8", 0.95), ("bf16", 0.95)):
        q = quantize(copy.deepcopy(model), mode)
        with torch.no_grad():
            got = q(ids)[0].argmax(-1)
        agree = (got == ref).float().mean().item()                      # teacher-forced top-1 agreement
        cont = generate(q, prompt, 40)
        same = sum(a == b for a, b in zip(cont, greedy)) / len(greedy)
        print(f"{mode}: teacher-forced agreement {agree:.3f}, greedy continuation agreement {same:.3f}")
        assert agree >= min_agree and same >= 0.9, (mode, agree, same)
    lm_head = quantize(copy.deepcopy(model), "int8").lm_head
    assert isinstance(lm_head, Int8Linear) and lm_head.backend == kernel
    with pytest.raises(FurnaceError, match="--dtype"):
        quantize(model, "int4")


# ---- streaming and sessions -------------------------------------------------------------------
def test_stream_decoder_reassembles_multibyte_text():
    tok = train_bpe(["plain ascii text"] * 5, vocab_size=270)
    text = "Héllo 😀 wörld\nnext line ✓\n"
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode(text)] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def session(model, tok, **kw):
    out, notes = [], []
    s = ChatSession(model, tok, write=out.append, notice=notes.append, **kw)
    return s, out, notes


def test_chat_session_streams_reuses_cache_and_trims(trained):
    model, tok = trained
    s, out, notes = session(model, tok, system="be brief", max_new_tokens=16)
    a1, stopped = s.respond("the cat sat on the")
    assert not stopped and "".join(out) == a1 and len(a1) > 0
    out.clear()
    a2, _ = s.respond("one two three")
    # Reusing the cache across turns gives the same answer as a fresh session on the same history.
    fresh, _, _ = session(model, tok, system="be brief", max_new_tokens=16)
    fresh.messages = copy.deepcopy(s.messages[:-1])
    fresh.messages.pop()                                                # the last user message is re-added
    assert fresh.respond("one two three")[0] == a2
    # Long turns overflow the 128-token context: oldest turns dropped with a notice, system kept.
    for _ in range(4):
        s.respond("red green blue yellow " * 4)
    assert any("dropped the oldest turn" in n for n in notes)
    assert s.messages[0] == {"role": "system", "content": "be brief"}
    assert len(s.build_prompt()) <= s.prompt_budget()


def test_prompt_longer_than_context_is_truncated_with_notice(trained):
    model, tok = trained
    s, out, notes = session(model, tok, max_new_tokens=8)
    answer, _ = s.respond("a b c d e f g " * 40)
    assert any("kept the last" in n for n in notes)


def test_interrupt_stops_only_the_answer(trained):
    model, tok = trained
    pieces = []

    def write(p):
        pieces.append(p)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    s = ChatSession(model, tok, write=write, notice=lambda n: None, max_new_tokens=30)
    partial, stopped = s.respond("the cat sat on the")
    assert stopped and s.messages[-1] == {"role": "assistant", "content": partial}
    pieces.append("x")                                                 # no more interrupts
    answer, stopped = s.respond("one two three")
    assert not stopped and answer
