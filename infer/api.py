"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI): what infer/serve.py serves.

    GET  /v1/models                 the one model served
    POST /v1/chat/completions       messages -> the one chat template (data/chat_template.py) -> answer
    POST /v1/completions            plain continuation of a prompt string
    GET  /health                    200 {"status": "ok", ...} once loaded, 503 while loading
    GET  /                          the web chat page (infer/web/index.html)

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with 400 / 401 / 404 / 429 / 503;
anything unexpected is logged here and reaches the client as a 500 without a traceback. Streaming answers are
server-sent events `data: {json}\\n\\n` ending with `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from data.chat_template import THINK_CLOSE, THINK_OPEN, encode_chat, missing_chat_tokens, stop_ids
from infer.engine import Engine, QueueFull, Request
from infer.sampling import SamplingParams
from infer.session import StreamDecoder
from kernels.common import FurnaceError

log = logging.getLogger("furnace")
PAGE = Path(__file__).parent / "web" / "index.html"


@dataclass
class Served:
    """What the app serves once loaded."""
    engine: Engine
    tokenizer: object
    model_id: str


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


# ---- request parsing -----------------------------------------------------------------------------
def _get(body: dict, name: str, kinds, default=None, check: Callable | None = None, expect: str = ""):
    """body[name] if present and of the right type (bool is never a number), else a 400 naming the field."""
    v = body.get(name)
    if v is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    ok = isinstance(v, kinds) and (bool in kinds or not isinstance(v, bool))
    if not ok or (check is not None and not check(v)):
        raise ApiError(400, f"'{name}': got {json.dumps(v)[:80]}; expected {expect}", param=name,
                       code="invalid_value" if ok else "invalid_type")
    return v


def sampling_options(body: dict, context: int) -> dict:
    """The sampling fields shared by both endpoints (unknown fields are ignored, as OpenAI does)."""
    num = (int, float)
    _get(body, "n", int, 1, lambda v: v == 1, "1 (one choice per request)")
    temperature = _get(body, "temperature", num, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2] (0 = greedy)")
    top_p = _get(body, "top_p", num, None, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _get(body, "top_k", int, None, lambda v: v >= 1, "a positive integer")
    rep = _get(body, "repetition_penalty", num, 1.0, lambda v: 0 < v <= 10, "a number in (0, 10]")
    max_tokens = _get(body, "max_completion_tokens", int, None, lambda v: v >= 1, "a positive integer")
    max_tokens = _get(body, "max_tokens", int, max_tokens, lambda v: v >= 1, "a positive integer")
    seed = _get(body, "seed", int, None, lambda v: 0 <= v < 2 ** 63, "an integer >= 0")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop': expected a non-empty string or a list of up to 4 of them", param="stop")
    truncate = _get(body, "truncate_prompt_tokens", int, None, lambda v: 1 <= v < context,
                    f"an integer in [1, {context - 1}] (keep that many last prompt tokens)")
    return {"params": SamplingParams(temperature, top_k, top_p if top_p != 1 else None, rep),
            "max_tokens": max_tokens or context, "seed": seed, "stop": stop or [], "truncate": truncate,
            "stream": _get(body, "stream", bool, False, expect="true or false"),
            "include_usage": bool(_get(body, "stream_options", dict, {}, expect="an object").get("include_usage"))}


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages': expected a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"'messages[{i}]': expected an object with 'role' and 'content'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: the text parts, joined
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"'messages[{i}].content': only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        role = "system" if m.get("role") == "developer" else m.get("role")
        out.append({"role": role, "content": content})
    return out


# ---- answer text: stop strings, reasoning split --------------------------------------------------
class AnswerText:
    """Accumulates decoded text and says what may be shown so far: cut at the first stop string, a tail that
    could still grow into a stop string held back, and (with `reasoning`) a leading <think>...</think> block
    moved to the reasoning channel. What it shows only ever grows, so deltas are plain suffixes."""

    def __init__(self, tokenizer, stops: list[str], reasoning: bool):
        self.dec = StreamDecoder(tokenizer)
        self.stops, self.reasoning = stops, reasoning
        self.text, self.stopped = "", False
        self.sent = ("", "")

    def push(self, token: int) -> tuple[str, str]:
        self.text += self.dec.push(token)
        return self._delta(final=False)

    def finish(self) -> tuple[str, str]:
        self.text += self.dec.flush()
        return self._delta(final=True)

    def _delta(self, final: bool) -> tuple[str, str]:
        r, c = self.visible(final)
        dr, dc = r[len(self.sent[0]):], c[len(self.sent[1]):]
        self.sent = (r, c)
        return dr, dc

    def visible(self, final: bool) -> tuple[str, str]:
        """(reasoning, content) that may be shown now."""
        text = self.text
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            text, self.stopped, final = text[:min(cuts)], True, True
        elif not final:
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        if not self.reasoning:
            return "", text
        if not text.startswith(THINK_OPEN):
            held = not final and THINK_OPEN.startswith(text)
            return "", "" if held else text
        body = text[len(THINK_OPEN):]
        end = body.find(THINK_CLOSE)
        if end < 0:
            return body.strip("\n") if final else body.lstrip("\n").rstrip("\n"), ""
        return body[:end].strip("\n"), body[end + len(THINK_CLOSE):].lstrip("\n")


# ---- the app ---------------------------------------------------------------------------------------
def create_app(load: Callable[[], Served], api_key: str | None = None,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """The app; `load()` runs on a thread at start-up (requests get 503 until it returns). A FurnaceError
    from it is logged and passed to `on_load_error` (serve.py stops the server with that one line)."""
    state: dict = {"served": None, "error": None}

    def _load():
        try:
            state["served"] = load()
            log.info(f"serve: ready ({state['served'].model_id})")
        except FurnaceError as e:
            state["error"] = str(e)
            log.error(f"error: {e}")
            if on_load_error:
                on_load_error(str(e))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=_load, name="furnace-load", daemon=True).start()
        yield
        if state["served"] is not None:
            state["served"].engine.close()

    app = FastAPI(title="Furnace", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        if exc.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}; see /v1/models, "
                                       f"/v1/chat/completions, /v1/completions, /health", code="not_found")
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request, exc):
        log.exception(f"{request.method} {request.url.path} failed")
        return error_response(500, "internal server error (logged on the server)", "server_error")

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    def served(request: HTTPRequest) -> Served:
        if api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {api_key}":
                raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                    "with the server's --api-key", code="invalid_api_key")
        s = state["served"]
        if s is None:
            raise ApiError(503, state["error"] or "the model is still loading; retry shortly", "server_error",
                           code="model_loading")
        return s

    async def json_body(request: HTTPRequest, s: Served) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({str(e)[:80]})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model': expected a string (see GET /v1/models)", param="model")
        if model != s.model_id:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{s.model_id}'",
                           param="model", code="model_not_found")
        return body

    @app.get("/health")
    async def health():
        s = state["served"]
        if s is None:
            return JSONResponse({"status": "error" if state["error"] else "loading", "error": state["error"]},
                                status_code=503)
        e = s.engine
        return {"status": "ok", "model": s.model_id, **e.stats(), "decode_steps": e.steps, "decode_rows": e.stepped_rows}

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        s = served(request)
        return {"object": "list", "data": [{"id": s.model_id, "object": "model", "created": 0, "owned_by": "furnace"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        s = served(request)
        body = await json_body(request, s)
        messages = chat_messages(body)
        missing = missing_chat_tokens(s.tokenizer)
        if missing:
            raise ApiError(400, f"this model's tokenizer lacks the chat tokens {missing} (a pretrain-only "
                                f"checkpoint): use /v1/completions", code="chat_not_supported")
        try:
            prompt = encode_chat(s.tokenizer, messages, add_generation_prompt=True)
        except FurnaceError as e:
            raise ApiError(400, str(e), param="messages") from None
        reasoning = _get(body, "include_reasoning", bool, False, expect="true or false")
        return await run(request, s, body, prompt, set(stop_ids(s.tokenizer)), reasoning, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        s = served(request)
        body = await json_body(request, s)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt': expected a non-empty string", param="prompt")
        return await run(request, s, body, s.tokenizer.encode(prompt), {s.tokenizer.eos_id}, False, chat=False)

    async def run(request: HTTPRequest, s: Served, body: dict, prompt: list[int], stops: set, reasoning: bool,
                  chat: bool):
        T = s.engine.T
        opts = sampling_options(body, T)
        if opts["truncate"]:
            prompt = prompt[-opts["truncate"]:]
        if len(prompt) >= T:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; this model's context is {T} (prompt plus at "
                                f"least one new token): shorten it or pass truncate_prompt_tokens", param="messages"
                           if chat else "prompt", code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def emit(item):
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        req = Request(prompt, opts["max_tokens"], emit, opts["params"], frozenset(stops), opts["seed"])
        try:
            s.engine.submit(req)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry later", "rate_limit_exceeded", code="queue_full") from None
        answer = AnswerText(s.tokenizer, opts["stop"], reasoning)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": s.model_id}
        counts = {"n": 0}

        async def events():
            """(reasoning delta, content delta, finish_reason or None) until the answer is complete."""
            finish = None
            try:
                while finish is None:
                    kind, value = await out.get()
                    if kind == "error":
                        raise RuntimeError(value)
                    if kind == "done":
                        finish = value
                        dr, dc = answer.finish()
                    else:
                        counts["n"] += 1
                        if value in stops:
                            continue
                        dr, dc = answer.push(value)
                        if answer.stopped:
                            finish = "stop"
                    if dr or dc or finish:
                        yield dr, dc, finish
            finally:
                s.engine.cancel(req)    # no-op when finished; frees the row at once when the client left

        def usage():
            return {"prompt_tokens": len(prompt), "completion_tokens": counts["n"],
                    "total_tokens": len(prompt) + counts["n"]}

        def choice(dr, dc, finish):
            if not chat:
                return {"index": 0, "text": dc, "logprobs": None, "finish_reason": finish}
            delta = {}
            if dr:
                delta["reasoning_content"] = dr
            if dc:
                delta["content"] = dc
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        if opts["stream"]:
            async def sse():
                if chat:
                    yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                try:
                    async for dr, dc, finish in events():
                        if dr or dc:
                            yield _sse({**head, "choices": [choice(dr, dc, None)]})
                        if finish:
                            yield _sse({**head, "choices": [choice("", "", finish)]})
                except RuntimeError as e:
                    log.error(f"serve: {e}")
                    yield _sse({"error": {"message": "generation failed (logged on the server)",
                                          "type": "server_error", "param": None, "code": None}})
                if opts["include_usage"]:
                    yield _sse({**head, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect():
            acc = ["", "", None]
            async for dr, dc, finish in events():
                acc = [acc[0] + dr, acc[1] + dc, finish]
            return acc

        task = asyncio.ensure_future(collect())
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():   # frees the row (events' finally)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return error_response(499, "client closed the request")
        try:
            reasoning_text, content, finish = task.result()
        except RuntimeError as e:
            log.error(f"serve: {e}")
            return error_response(500, "generation failed (logged on the server)", "server_error")
        if chat:
            message = {"role": "assistant", "content": content}
            if reasoning:
                message["reasoning_content"] = reasoning_text
            first = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        else:
            first = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [first],
                "usage": usage()}

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
