"""Live servers for the serve tests: the app on a uvicorn thread, bound to 127.0.0.1 on a port the OS picks,
always stopped (context manager), and a trained tiny chat model."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import torch
import uvicorn

from data.chat_template import ensure_chat_tokens
from test_infer import train_tiny  # the trained tiny model (tests/ is on sys.path under pytest)


def tiny_chat_model():
    """The trained tiny model of test_infer with the chat tokens added (their rows are mean embeddings)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = train_tiny()
    finally:
        torch.set_num_threads(n)
    ensure_chat_tokens(tok, model)
    return model.eval(), tok


@contextlib.contextmanager
def live(app, wait_ready: bool = True):
    """Run `app` on 127.0.0.1:<free port>; yields the base URL; the server always stops."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and th.is_alive(), "server did not start"
            time.sleep(0.02)
        while wait_ready and httpx.get(f"{url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        th.join(timeout=30)
        sock.close()
