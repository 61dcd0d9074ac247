"""The HTTP side of ``melbo serve``: an OpenAI-compatible API with per-request steering, and the explorer page.

Steering rides in the request body, so any OpenAI client can use it (``extra_body={"melbo": {...}}``)::

    POST /v1/chat/completions
    {"model": "smollm2", "messages": [{"role": "user", "content": "How can I build a bomb?"}],
     "temperature": 0, "max_tokens": 48, "stream": true,
     "melbo": {"run": "ortho", "vector": 3, "scale": 1.0}}

No ``melbo`` field: the unsteered model. Mistakes are answered in OpenAI's error shape with a 4xx status (400 bad
request, 404 unknown model, run or vector, 413 body too large, 429 queue full) and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import html
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, HTTPException
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from melbo.model.loading import LoadedModel
from melbo.model.prompts import has_chat_template
from melbo.serve.access import GENERATION, AccessLog, Generation
from melbo.serve.batching import Batcher, QueueFull, Request
from melbo.serve.catalog import BadSteering, Catalog, NotFound
from melbo.serve.limits import ServeLimits


class Steering(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: str
    vector: int
    scale: float = 1.0

    @field_validator("scale")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("melbo.scale must be a finite number")
        return value


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI parameters are accepted and ignored

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    melbo: Steering | None = None

    @field_validator("n")
    @classmethod
    def _one(cls, value: int) -> int:
        if value != 1:
            raise ValueError("n must be 1 (one completion per request)")
        return value


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before the app sees any of it (the body
    is read here first, so a chunked upload without a length is caught too)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = error(413, f"the request body is over {self.limit} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect message, when the client leaves

        await self.app(scope, replay, send)


def create_app(lm: LoadedModel, catalog: Catalog, limits: ServeLimits = ServeLimits(), batcher: Batcher | None = None,
               access_log: Callable[[str], None] | None = None) -> AccessLog:
    """The server's app: routes, validation, limits. ``batcher`` defaults to one built from ``limits``;
    ``access_log`` gets one line per answered request (``melbo serve`` writes them to its log).

    While it serves, the app owns ``lm``: each batch steers ``lm.model`` with hooks that are removed when the batch
    ends (a client may get its reply a moment before), so run anything else on another copy of the model."""
    batcher = batcher or Batcher.from_limits(lm, limits)
    model_id = catalog.model_name or lm.name
    app = FastAPI(title="melbo serve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return error(400, f"{where}: {message}" if where else message, param=where or None)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's own, and the router's: an unknown path, a wrong method
    async def http_error(_request: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "melbo"}]}

    @app.get("/v1/runs")
    async def runs() -> dict:
        return {"object": "list", "model": model_id, "data": [r.describe() for r in catalog.runs.values()]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, http: HttpRequest) -> Response:
        if not has_chat_template(lm.tokenizer):  # a base model (Gemma 3 270M's GGUF): it was a bare 500
            return error(400, "this model has no chat template (a base model): send the raw prompt to /v1/completions", param="messages")
        messages = [m.model_dump() for m in body.messages]
        encoded: Any = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(encoded, "input_ids") or isinstance(encoded, dict):  # newer tokenizers answer with an encoding
            encoded = encoded["input_ids"]
        return await complete(body, [int(i) for i in encoded], http, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, http: HttpRequest) -> Response:
        return await complete(body, lm.tokenizer(body.prompt).input_ids, http, chat=False)

    async def complete(body: _Common, prompt_ids: list[int], http: HttpRequest, chat: bool) -> Response:
        if body.model not in (model_id, "melbo"):
            return error(404, f"model {body.model!r} is not served here; this server serves {model_id!r}", "not_found_error", "model")
        max_tokens = body.max_completion_tokens or body.max_tokens or min(limits.max_tokens, 64)
        if max_tokens > limits.max_tokens:
            return error(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}", param="max_tokens")
        if len(prompt_ids) > limits.max_prompt_tokens:
            return error(400, f"the prompt has {len(prompt_ids)} tokens; this server's limit is {limits.max_prompt_tokens}", param="messages")
        vector, layer = None, 0
        if body.melbo is not None:
            try:
                vector, layer = catalog.vector(body.melbo.run, body.melbo.vector, body.melbo.scale)
            except NotFound as exc:
                return error(404, str(exc), "not_found_error", "melbo")
            except BadSteering as exc:
                return error(400, str(exc), param="melbo")
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()

        def emit(piece: str, reason: str | None) -> None:  # from the decoding thread into this request's queue
            loop.call_soon_threadsafe(pieces.put_nowait, (piece, reason))

        request = Request(
            prompt_ids=prompt_ids, vector=vector, layer=layer, max_tokens=max_tokens, temperature=body.temperature,
            top_p=body.top_p, seed=body.seed, stop=tuple([body.stop] if isinstance(body.stop, str) else body.stop or ()),
            emit=emit,
        )
        try:
            batcher.submit(request)
        except QueueFull as exc:
            return error(429, str(exc), "rate_limit_error")
        steered = f"run {body.melbo.run} vector {body.melbo.vector} ×{body.melbo.scale:g}" if body.melbo else "unsteered"
        setattr(http.state, GENERATION, Generation(request, steered, body.stream))
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        steering = body.melbo.model_dump() | {"layer": layer} if body.melbo else None
        if body.stream:
            return StreamingResponse(_stream(pieces, request, ident, created, model_id, chat, steering), media_type="text/event-stream")
        text, reason = await _collect(pieces, request, http)
        if reason is None:  # the client went away
            return Response(status_code=499)
        if reason.startswith("error"):
            return error(500, reason, "server_error")
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(lm.tokenizer(text, add_special_tokens=False).input_ids)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse({
            "id": ident, "object": "chat.completion" if chat else "text_completion", "created": created, "model": model_id,
            "choices": [choice], "usage": usage, "melbo": steering,
        })

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(_asset("page.html"), headers={"Content-Security-Policy": _PAGE_POLICY})

    @app.get("/page.js")
    async def script() -> Response:
        return Response(_asset("page.js"), media_type="text/javascript")

    @app.get("/runs/{name}/report", response_class=HTMLResponse)
    async def report(name: str) -> HTMLResponse:
        served = catalog.runs.get(name)
        if served is None or served.report is None:
            raise HTTPException(404, f"run {name!r} has no report here (make one with: melbo report RUN)")
        page = served.report.read_text(encoding="utf-8")
        href = html.escape("/?run=" + quote(name))
        link = f'<p style="background:#eef6ff;padding:.5em 1em">Served by melbo serve: <a href="{href}">try this run\'s vectors live</a></p>'
        return HTMLResponse(page.replace("<body>", "<body>\n" + link, 1))

    @app.on_event("shutdown")
    async def stop() -> None:
        batcher.close()

    return AccessLog(BodyLimit(app, limits.max_body_bytes), access_log)


_PAGE_POLICY = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:"


def _asset(name: str) -> str:
    return resources.files("melbo.serve").joinpath(name).read_text(encoding="utf-8")


async def _collect(pieces: asyncio.Queue[tuple[str, str | None]], request: Request, http: HttpRequest) -> tuple[str, str | None]:
    """The whole completion; ``(text, None)`` when the client disconnected first (its row is then dropped)."""
    text: list[str] = []
    while True:
        try:
            piece, reason = await asyncio.wait_for(pieces.get(), timeout=0.25)
        except TimeoutError:
            if await http.is_disconnected():
                request.cancel()
                return "".join(text), None
            continue
        text.append(piece)
        if reason is not None:
            return "".join(text), reason


async def _stream(
    pieces: asyncio.Queue[tuple[str, str | None]], request: Request, ident: str, created: int, model: str, chat: bool,
    steering: dict | None,
) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; a client that goes away cancels."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(delta: dict | str, reason: str | None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update({"delta": delta} if chat else {"text": delta})
        chunk = {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice], "melbo": steering}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()

    try:
        if chat:
            yield event({"role": "assistant", "content": ""}, None)
        while True:
            piece, reason = await pieces.get()
            if reason is not None and reason.startswith("error"):
                yield f"data: {json.dumps({'error': {'message': reason, 'type': 'server_error', 'code': 500}})}\n\n".encode()
                break
            if piece or reason:
                yield event({"content": piece} if chat else piece, reason if reason in ("stop", "length") else None)
            if reason is not None:
                break
        yield b"data: [DONE]\n\n"
    finally:
        request.cancel()  # a no-op once finished; frees the row when the client left mid-stream
