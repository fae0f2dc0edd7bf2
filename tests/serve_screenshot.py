"""Makes infer/web/screenshot.png: the page in headless chromium over the trained tiny test model (two real
greedy turns: its text is what a 2-layer model trained for 80 steps says) and one replayed answer that shows
the reasoning block.   python tests/serve_screenshot.py"""
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

OUT = HERE.parent / "infer" / "web" / "screenshot.png"


def main():
    import torch
    from playwright.sync_api import sync_playwright

    from infer.api import Served, create_app
    from infer.engine import Engine
    from serve_util import live, tiny_chat_model
    from test_serve_web import CHROMIUM, CHROMIUM_ARGS, ask

    torch.set_num_threads(1)
    model, tok = tiny_chat_model()
    head = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "tiny-trained"}
    deltas = [{"reasoning_content": "The user lists days; continue the pattern."}, {"content": "wednesday thursday."}]
    replay = "".join(f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': d, 'finish_reason': None}]})}\n\n"
                     for d in deltas) + "data: [DONE]\n\n"
    with live(create_app(lambda: Served(Engine(model, 4, 8), tok, "tiny-trained"))) as url, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(tempfile.mkdtemp(), headless=True, executable_path=CHROMIUM,
                                                    args=CHROMIUM_ARGS, viewport={"width": 900, "height": 560})
        try:
            pg = ctx.new_page()
            pg.goto(url + "/")
            pg.wait_for_function("document.getElementById('status').textContent.startsWith('model: ')")
            pg.fill("#temperature", "0")
            pg.fill("#max-tokens", "40")
            ask(pg, "the cat sat on")
            ask(pg, "monday tuesday")
            pg.route("**/v1/chat/completions", lambda r: r.fulfill(status=200, body=replay,
                                                                   content_type="text/event-stream"))
            ask(pg, "and then? (replayed answer with reasoning)")
            pg.locator("details.reasoning summary").last.click()
            pg.locator(".msg").last.scroll_into_view_if_needed()
            pg.screenshot(path=str(OUT))
        finally:
            ctx.close()
    print(OUT)


if __name__ == "__main__":
    main()
