"""infer/serve.py's API with the real `openai` client against a live server on 127.0.0.1 (a trained tiny model):
answers equal infer.generate, streaming, stop strings, usage, seeds, concurrency, every error status."""
import concurrent.futures as cf
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from data.chat_template import encode_chat, stop_ids
from infer import generate
from infer.api import Served, create_app
from infer.engine import Engine
from model import GPT, GPTConfig
from serve_util import live, tiny_chat_model

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "tiny"


@pytest.fixture(scope="module")
def tiny():
    return tiny_chat_model()


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = tiny
    engine = Engine(model, max_slots=4, max_queue=16)
    with live(create_app(lambda: Served(engine, tok, MODEL))) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_reference(tiny, messages, n, **kw):
    """(answer text, prompt ids, new ids incl. a stop token) from infer.generate, the unbatched path."""
    model, tok = tiny
    prompt = encode_chat(tok, messages, add_generation_prompt=True)
    stops = stop_ids(tok)
    new = generate(model, prompt, n, stop_ids=stops, **kw)
    return tok.decode([t for t in new if t not in stops]), prompt, new


def user(text):
    return [{"role": "user", "content": text}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = httpx.get(server[0] + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["slots"] == 4


def test_chat_greedy_equals_generate_with_tokenizer_usage(tiny, client):
    msgs = [{"role": "system", "content": "be brief"}, *user("the cat sat on")]
    want, prompt, new = chat_reference(tiny, msgs, 24)
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=24)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == ("stop" if new[-1] in stop_ids(tiny[1]) else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (len(prompt), len(new), len(prompt) + len(new))


def test_chat_stream_matches_non_stream_and_ends_with_done(tiny, server, client):
    msgs = user("one two three")
    want, prompt, new = chat_reference(tiny, msgs, 30)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id and c.model == MODEL for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == len(new) and chunks[-1].usage.prompt_tokens == len(prompt)
    # the raw wire format: SSE events, the last one [DONE]
    body = {"model": MODEL, "messages": msgs, "temperature": 0, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_completions_stream_and_not(tiny, client):
    model, tok = tiny
    prompt = tok.encode("the dog ran")
    new = generate(model, prompt, 20, stop_ids=[tok.eos_id])
    want = tok.decode([t for t in new if t != tok.eos_id])
    r = client.completions.create(model=MODEL, prompt="the dog ran", temperature=0, max_tokens=20)
    assert r.object == "text_completion" and r.choices[0].text == want
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(new))
    streamed = client.completions.create(model=MODEL, prompt="the dog ran", temperature=0, max_tokens=20, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_stop_strings_cut_the_answer(tiny, client):
    model, tok = tiny
    full = tok.decode(generate(model, tok.encode("the sun"), 30))
    stop = full[len(full) // 2:len(full) // 2 + 3]              # a piece from the middle of the answer
    want = full[:full.find(stop)]
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt="the sun", temperature=0, max_tokens=30, stop=[stop, "@@"],
                                      stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
            assert finish == ["stop"]
        else:
            text = r.choices[0].text
            assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 30
        assert text == want


def test_seeded_sampling_is_reproducible_and_equals_generate(tiny, client):
    msgs = user("red green")
    kw = dict(model=MODEL, messages=msgs, temperature=1.0, top_p=0.95, max_tokens=24, extra_body={"top_k": 50})
    a = [client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (11, 11, 12, 13)]
    assert a[0] == a[1]
    assert len(set(a[1:])) > 1                                   # other seeds draw other answers
    want, _, _ = chat_reference(tiny, msgs, 24, temperature=1.0, top_p=0.95, top_k=50, seed=11)
    assert a[0] == want


def test_concurrent_greedy_requests_equal_solo_ones(tiny, server, client):
    """Seven requests of different lengths through 4 slots: rows join and leave between steps (and move to
    other rows when one before them finishes); every answer must still be the unbatched one."""
    engine = server[1]
    texts = ["the cat", "one two three four", "monday", "x y z. the", "a b c d e f", "blue", "the park is"]
    sizes = [30, 12, 25, 8, 40, 17, 22]
    want = [chat_reference(tiny, user(t), n)[0] for t, n in zip(texts, sizes)]
    steps0, rows0 = engine.steps, engine.stepped_rows
    with cf.ThreadPoolExecutor(len(texts)) as ex:
        got = list(ex.map(lambda tn: client.chat.completions.create(
            model=MODEL, messages=user(tn[0]), temperature=0, max_tokens=tn[1]).choices[0].message.content,
            zip(texts, sizes)))
    assert got == want
    assert (engine.stepped_rows - rows0) / (engine.steps - steps0) > 1.5    # the requests did share steps


def test_content_parts_developer_role_and_reasoning_field(tiny, server):
    """OpenAI's text content parts are joined, 'developer' is the system role, include_reasoning adds the
    reasoning_content field (empty here: this model never opens a <think> block; tests/test_serve_engine.py
    checks the split itself)."""
    msgs = [{"role": "system", "content": "be brief"}, *user("the cat sat")]
    want, _, _ = chat_reference(tiny, msgs, 10)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
             {"role": "user", "content": [{"type": "text", "text": "the cat sat"}]}]
    body = {"model": MODEL, "messages": parts, "temperature": 0, "max_tokens": 10, "include_reasoning": True}
    msg = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": want, "reasoning_content": ""}


# ---- errors ----------------------------------------------------------------------------------------
def check_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in r.text
    assert set(err) == {"message", "type", "param", "code"}
    if code:
        assert err["code"] == code
    return err


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": "hi"}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"model": MODEL, "messages": user("hi"), "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "messages": user("hi"), "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": user("hi"), "max_tokens": True}, "max_tokens"),
    ({"model": MODEL, "messages": user("hi"), "top_p": 1.5}, "top_p"),
    ({"model": MODEL, "messages": user("hi"), "n": 2}, "n"),
    ({"model": MODEL, "messages": user("hi"), "stop": 5}, "stop"),
    ({"model": MODEL, "messages": user("hi"), "stream": "yes"}, "stream"),
    ({"messages": user("hi")}, "model"),
])
def test_bad_requests_get_400(server, body, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    err = check_error(httpx.post(server[0] + "/v1/chat/completions", timeout=30, **kw), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_prompt_longer_than_context_400_unless_truncated(tiny, server, client):
    long = "the cat sat on the mat. " * 40                      # far more than the 128-token context
    body = {"model": MODEL, "prompt": long, "max_tokens": 4, "temperature": 0}
    check_error(httpx.post(server[0] + "/v1/completions", json=body, timeout=30), 400, "context_length_exceeded")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=user(long), max_tokens=4)
    r = httpx.post(server[0] + "/v1/completions", json={**body, "truncate_prompt_tokens": 100}, timeout=60).json()
    assert r["usage"]["prompt_tokens"] == 100 and r["usage"]["completion_tokens"] == 4


def test_unknown_route_and_model_get_404(server, client):
    check_error(httpx.get(server[0] + "/v1/engines", timeout=10), 404, "not_found")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert e.value.body["code"] == "model_not_found"


def test_api_key_required(tiny):
    model, tok = tiny
    with live(create_app(lambda: Served(Engine(model, 1, 1), tok, MODEL), api_key="s3cret")) as url:
        check_error(httpx.get(url + "/v1/models", timeout=10), 401, "invalid_api_key")
        check_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=MODEL, prompt="the", max_tokens=3).usage.completion_tokens == 3


def test_503_while_loading(tiny):
    model, tok = tiny
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return Served(Engine(model, 1, 1), tok, MODEL)

    with live(create_app(slow_load), wait_ready=False) as url:
        assert httpx.get(url + "/health", timeout=10).status_code == 503
        err = check_error(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a"}, timeout=10), 503)
        assert err["code"] == "model_loading"
        gate.set()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2},
                          timeout=30).status_code == 200


def test_429_when_the_queue_is_full_and_disconnects_free_their_slot(tiny):
    """One slot, a queue of one: a long stream holds the slot, a second request waits, a third gets 429.
    Then the long stream's client leaves mid-answer: the waiting request still completes, nothing stays busy."""
    _, tok = tiny
    torch.manual_seed(0)   # a random model with a long context: its 4000-token answer takes seconds
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                          max_seq_len=4096, kernels="torch")).eval()
    engine = Engine(model, max_slots=1, max_queue=1)
    with live(create_app(lambda: Served(engine, tok, MODEL))) as url:
        long = {"model": MODEL, "prompt": "the", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b:
            with a.stream("POST", url + "/v1/completions", json=long) as ra:
                lines = ra.iter_lines()
                assert next(lines).startswith("data: ")          # the slot is taken and streaming
                waiting = cf.ThreadPoolExecutor(1).submit(
                    b.post, url + "/v1/completions", json={"model": MODEL, "prompt": "one", "max_tokens": 5})
                deadline = time.monotonic() + 30
                while engine.stats()["waiting"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                check_error(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=30),
                            429, "queue_full")
            # the first client closed its stream mid-answer here
            assert waiting.result(timeout=60).json()["usage"]["completion_tokens"] == 5
        deadline = time.monotonic() + 30
        while engine.stats() != {"active": 0, "waiting": 0, "slots": 1}:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.02)
        assert engine.tokens < 1000          # the abandoned stream stopped long before its 4000 tokens


def test_a_failing_step_reaches_clients_as_500_without_traceback(tiny):
    """A bug inside the decode step (here: the model raises) answers the requests in flight with a generic
    error, never the exception text or a traceback, and the server keeps serving."""
    model, tok = tiny
    engine = Engine(model, max_slots=2, max_queue=4)
    real = model.hidden_states
    with live(create_app(lambda: Served(engine, tok, MODEL))) as url:
        model.hidden_states = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("secret internals"))
        try:
            body = {"model": MODEL, "prompt": "the cat", "max_tokens": 5}
            r = httpx.post(url + "/v1/completions", json=body, timeout=30)
            check_error(r, 500)
            assert "secret" not in r.text
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
                events = [line for line in s.iter_lines() if line]
            assert "error" in json.loads(events[0][6:]) and events[-1] == "data: [DONE]"
            assert "secret" not in "".join(events)
        finally:
            del model.hidden_states
        assert model.hidden_states == real
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).json()["usage"]["completion_tokens"] == 5
