"""The web chat page in a real headless browser: Debian's chromium driven by Playwright's Python API (no browser
download), against `python infer/serve.py` started as a process on 127.0.0.1."""
import json
import time
from pathlib import Path

import httpx
import pytest
import torch

from bench.serve_bench import serve_process
from data.chat_template import encode_chat, stop_ids
from infer import generate
from model import GPT, GPTConfig, save
from serve_util import tiny_chat_model

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = "/usr/bin/chromium"   # Debian's package (.ci/run installs it)
# This machine has no network: without these flags chromium stalls on connection attempts.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A random tiny model with a long context (so an answer can be stopped mid-way) and the chat tokens,
    saved as a checkpoint and served by infer/serve.py on a free port. -> (url, model, tokenizer)"""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: apt-get install chromium (see .ci/run)"
    _, tok = tiny_chat_model()
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=4, n_embd=384, n_head=4, n_kv_head=2, ffn_hidden=1024,
                          max_seq_len=4096, kernels="torch")).eval()   # 4000 tokens: tens of seconds
    d = tmp_path_factory.mktemp("web") / "tiny-web"
    save(model, d)
    tok.save(d)
    with serve_process(d, ["--threads", "1"], d.parent / "serve.log", timeout=120) as url:
        yield url, model, tok


@pytest.fixture(scope="module")
def page(served, tmp_path_factory):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("profile")), headless=True,
                                                    executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                    viewport={"width": 900, "height": 640})
        try:
            pg = ctx.new_page()
            pg.set_default_timeout(60_000)
            pg.goto(served[0] + "/")
            pg.wait_for_function("document.getElementById('status').textContent.startsWith('model: ')")
            yield pg
        finally:
            ctx.close()


def greedy_answer(model, tok, messages, n):
    stops = stop_ids(tok)
    new = generate(model, encode_chat(tok, messages, add_generation_prompt=True), n, stop_ids=stops)
    return tok.decode([t for t in new if t not in stops])


def ask(pg, text):
    pg.fill("#input", text)
    pg.press("#input", "Enter")
    pg.wait_for_function("document.getElementById('stop').disabled === false || "
                         "document.querySelectorAll('.assistant').length > 0")
    pg.wait_for_function("document.getElementById('send').disabled === false")     # the answer is complete
    return pg.locator(".assistant .content").last.inner_text()


def test_page_streams_a_multi_turn_chat_and_stops(page, served):
    url, model, tok = served
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    first = ask(page, "the cat sat")
    want = greedy_answer(model, tok, [{"role": "user", "content": "the cat sat"}], 12)
    assert first == want and first
    second = ask(page, "and then?")
    history = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": want},
               {"role": "user", "content": "and then?"}]
    assert second == greedy_answer(model, tok, history, 12)
    assert page.locator(".msg").all_inner_texts()[0::2] == ["the cat sat", "and then?"]
    assert len(page.locator(".assistant").all()) == 2



def test_page_shows_reasoning_in_a_collapsible_block(page, served):
    """The server's stream with reasoning_content (the format tests/test_serve.py checks), replayed to the page:
    the reasoning goes into a closed <details> block, the answer into the bubble."""
    head = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "tiny-web"}
    deltas = [{"role": "assistant", "content": ""}, {"reasoning_content": "first "}, {"reasoning_content": "think"},
              {"content": "the "}, {"content": "answer"}]
    events = [{**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, body=body,
                                                                     content_type="text/event-stream"))
    try:
        assert ask(page, "why?") == "the answer"
    finally:
        page.unroute("**/v1/chat/completions")
    block = page.locator(".assistant details.reasoning").last
    assert block.is_visible() and block.get_attribute("open") is None
    block.locator("summary").click()
    assert "first think" in block.inner_text()


def test_stop_button_cuts_the_answer_and_frees_the_slot(page, served):
    url, model, tok = served
    page.click("#reset")                                      # "New chat" forgets the conversation
    assert page.locator(".msg").count() == 0
    page.fill("#temperature", "0")
    # stop: a 4000-token answer (tens of seconds) is cut after some streamed text; the server frees its slot
    page.fill("#max-tokens", "4000")
    page.fill("#input", "tell me everything")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.assistant .content')[0].textContent.length > 20")
    page.click("#stop")
    page.wait_for_function("document.getElementById('send').disabled === false")
    cut = page.locator(".assistant .content").last.inner_text()
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health", timeout=5).json()["active"] != 0:
        assert time.monotonic() < deadline, "the stopped answer still runs on the server"
        time.sleep(0.05)
    n = len(tok.encode(cut))
    assert n < 1000                                      # far from the 4000 tokens asked for
    full = greedy_answer(model, tok, [{"role": "user", "content": "tell me everything"}], n + 8)
    assert len(cut) > 20 and full.startswith(cut)
    page.fill("#max-tokens", "12")
