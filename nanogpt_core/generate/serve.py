"""``gpt serve``: an OpenAI-compatible HTTP server for a checkpoint.

:func:`create_app` builds the FastAPI application (tests build it in-process
too); :func:`serve` loads a checkpoint and runs it under uvicorn. Generation
itself (admission, continuous batching, stop strings) is in
:mod:`nanogpt_core.generate.engine` and the modules it names, the request bodies and chat rendering in
:mod:`nanogpt_core.generate.serve_api`, the error answers in
:mod:`nanogpt_core.generate.serve_errors`.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.resources
import json
import secrets
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nanogpt_core.data.templates import Template
from nanogpt_core.errors import PluginFault
from nanogpt_core.generate.engine import MAX_BATCH, MAX_QUEUE, Engine, Ticket
from nanogpt_core.generate.openai_shapes import ChatShape, CompletionShape, usage
from nanogpt_core.generate.sampling import LoadedModel, encode_prompt
from nanogpt_core.generate.scheduler import PREFILL_CHUNK
from nanogpt_core.generate.serve_api import (
    PLAIN_STOP,
    ChatBody,
    CompletionBody,
    SamplingBody,
    plain_context,
    template_context,
)
from nanogpt_core.generate.serve_errors import APIError, add_error_handlers, server_fault
from nanogpt_core.generate.serve_generation import Finish, GenerationFailed, Piece, Sampling

TRUNCATED_HEADER = "X-Nanogpt-Prompt-Truncated"
# OpenAI's legacy completions default; chat answers run to end-of-text or block_size.
COMPLETION_MAX_TOKENS = 16
PLACEHOLDER_PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>nanogpt chat</title></head>"
    "<body><h1>nanogpt</h1><p>The chat page is not installed; the API is at /v1/.</p>"
    "</body></html>"
)


def model_name_of(ckpt: Path) -> str:
    """The run name for ``results/<name>/checkpoints/x.pth``, else the file's stem."""
    if ckpt.parent.name == "checkpoints" and ckpt.parent.parent.name:
        return ckpt.parent.parent.name
    return ckpt.stem


class RequireKey:
    """ASGI middleware: ``/v1/`` requests need ``Authorization: Bearer KEY`` (else 401)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Answer 401 for a wrong or missing key; pass everything else on."""
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(
                    401,
                    "missing or wrong API key: send the server's --api-key as "
                    "'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class TicketedStream(StreamingResponse):
    """A streaming response that gives its queue place back however it ends.

    The body may never start (the client left first), so releasing in the
    body's own ``finally`` would not be enough.
    """

    def __init__(self, ticket: Ticket, content: AsyncIterator[str], headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.ticket = ticket

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Send the stream, then release the ticket."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


def create_app(
    loaded: LoadedModel,
    *,
    template: Template | None = None,
    api_key: str | None = None,
    max_batch: int = MAX_BATCH,
    max_queue: int = MAX_QUEUE,
    prefill_chunk: int = PREFILL_CHUNK,
    request_timeout: float | None = None,
    model_name: str = "nanogpt",
) -> FastAPI:
    """The FastAPI application serving ``loaded`` (chat through ``template`` when given).

    Without a template, chat completions see a plain "User: ... / Assistant:"
    transcript and stop at a new "User:" line. The batching options are
    :class:`~nanogpt_core.generate.engine.Engine`'s.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The engine's scheduler thread lives as long as the server.
        app.state.engine = Engine(
            loaded,
            max_batch=max_batch,
            max_queue=max_queue,
            prefill_chunk=prefill_chunk,
            request_timeout=request_timeout,
        )
        yield
        app.state.engine.shutdown()

    app = FastAPI(title="nanogpt", lifespan=lifespan, docs_url=None, redoc_url=None)
    if api_key:
        app.add_middleware(RequireKey, api_key=api_key)
    add_error_handlers(app)
    served = Served(loaded, template, model_name)
    _add_routes(app, served)
    return app


class Served:
    """What a request needs: the model, its chat template and its public name."""

    def __init__(self, loaded: LoadedModel, template: Template | None, name: str) -> None:
        self.loaded = loaded
        self.template = template
        self.name = name

    def check_model(self, body: SamplingBody) -> None:
        """Refuse a request for another model (no model given is fine)."""
        if body.model is not None and body.model != self.name:
            raise APIError(
                400,
                f"model {body.model!r} does not exist; this server has {self.name!r}",
                param="model",
                code="model_not_found",
            )

    def sampling(self, body: SamplingBody, max_tokens: int | None, default: int) -> Sampling:
        """The sampling parameters of a request, defaults filled in."""
        return Sampling(
            max_tokens=max_tokens or default,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=body.stops(),
            seed=body.seed,
            n=body.n or 1,
        )


def _add_routes(app: FastAPI, served: Served) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(chat_page())

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": served.name, "object": "model", "created": 0, "owned_by": "nanogpt"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody) -> Any:
        served.check_model(body)
        ids, dropped = encode_prompt(served.loaded, body.prompt)
        sampling = served.sampling(body, body.max_tokens, COMPLETION_MAX_TOKENS)
        return await respond(request, body, ids, dropped, sampling, CompletionShape(served.name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody) -> Any:
        served.check_model(body)
        block_size = int(served.loaded.model.config.block_size)
        max_tokens = body.max_completion_tokens or body.max_tokens
        sampling = served.sampling(body, max_tokens, block_size)
        if served.template is None:
            ids, dropped = plain_context(served.loaded, body.messages)
            sampling = _with_stop(sampling, PLAIN_STOP)
        else:
            ids, dropped = template_context(served.loaded, served.template, body.messages)
        return await respond(request, body, ids, dropped, sampling, ChatShape(served.name))


def _with_stop(sampling: Sampling, stop: str) -> Sampling:
    import attrs

    return attrs.evolve(sampling, stop=(*sampling.stop, stop))


def chat_page() -> str:
    """The web chat page shipped with the package; a placeholder until it exists."""
    page = importlib.resources.files("nanogpt_core.generate") / "chat_page.html"
    try:
        return page.read_text(encoding="utf-8")
    except FileNotFoundError:
        return PLACEHOLDER_PAGE


async def respond(
    request: Request,
    body: SamplingBody,
    ids: list[int],
    dropped: int,
    sampling: Sampling,
    shape: CompletionShape,
) -> Any:
    """Queue the request, then answer it whole or as server-sent events."""
    engine: Engine = request.app.state.engine
    ticket = engine.admit()
    headers = {TRUNCATED_HEADER: str(dropped)} if dropped else {}
    head = {
        "id": f"{shape.prefix}-{secrets.token_hex(12)}",
        "created": int(time.time()),
        "model": shape.model,
    }
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(engine, ids, sampling, shape, head, include_usage)
        return TicketedStream(ticket, events, headers)
    try:
        answer = await _whole(engine, ids, sampling, shape, head)
    finally:
        ticket.release()
    return JSONResponse(answer, headers=headers)


async def _whole(
    engine: Engine, ids: list[int], sampling: Sampling, shape: CompletionShape, head: dict
) -> dict[str, Any]:
    texts = [""] * sampling.n
    choices: list[dict[str, Any]] = []
    generated = 0
    async with contextlib.aclosing(engine.generate(ids, sampling)) as items:
        async for item in items:
            if isinstance(item, Piece):
                texts[item.index] += item.text
            else:
                generated += item.completion_tokens
                choices.append(shape.final(item.index, texts[item.index], item.reason))
    return {**head, "object": shape.whole, "choices": choices, "usage": usage(len(ids), generated)}


async def _events(
    engine: Engine,
    ids: list[int],
    sampling: Sampling,
    shape: CompletionShape,
    head: dict,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {**head, "object": shape.chunk, "choices": choices, **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    started: set[int] = set()
    generated = 0
    async with contextlib.aclosing(engine.generate(ids, sampling)) as items:
        try:
            async for item in items:
                if item.index not in started:
                    started.add(item.index)
                    if (opening := shape.start(item.index)) is not None:
                        yield event([opening])
                if isinstance(item, Piece):
                    yield event([shape.piece(item.index, item.text)])
                else:
                    assert isinstance(item, Finish)
                    generated += item.completion_tokens
                    yield event([shape.piece(item.index, "", item.reason)])
        except (PluginFault, GenerationFailed) as exc:
            # The headers went out: the error is the stream's last event.
            fault = server_fault(exc)
            yield f"data: {json.dumps({'error': fault.fields()})}\n\n"
            return
    if include_usage:
        yield event([], usage=usage(len(ids), generated))
    yield "data: [DONE]\n\n"


def serve(
    ckpt: Path,
    *,
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int = MAX_BATCH,
    max_queue: int = MAX_QUEUE,
    prefill_chunk: int = PREFILL_CHUNK,
    request_timeout: float | None = None,
    dtype: str = "auto",
    grace: float,
    device: str,
) -> None:
    """What ``gpt serve`` does: load the checkpoint and serve it until SIGTERM or Ctrl-C."""
    import click
    import uvicorn

    from nanogpt_core.generate.sampling import contained_from_description, load_model
    from nanogpt_core.generate.serve_memory import check_kv_fits, resolve_dtype, to_dtype
    from nanogpt_core.plugins.registry import load_plugins

    plugins = load_plugins()
    loaded = load_model(ckpt, device, plugins)
    precision = resolve_dtype(dtype, loaded.device)
    to_dtype(loaded.model, precision)  # the KV cache takes the model's dtype
    # Checked with the weights on the device: what is free is what the cache gets.
    check_kv_fits(loaded.model.config, max_batch, precision, loaded.device)
    template = (
        None
        if loaded.template is None
        else contained_from_description("template", loaded.template, plugins)
    )
    name = model_name_of(ckpt)
    app = create_app(
        loaded,
        template=template,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
        request_timeout=request_timeout,
        model_name=name,
    )
    chat = f"template {loaded.template.get('kind')!r}" if loaded.template else "plain transcript"
    click.echo(
        f"serving {ckpt} as model {name!r} ({chat}) on http://{host}:{port}/ "
        f"(batch {max_batch}, queue {max_queue}, {str(precision).removeprefix('torch.')})",
        err=True,
    )
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT and then raises the signal
    # again under the handler it found: make that handler a no-op, so a server
    # stopped on purpose exits 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    uvicorn.Server(config).run()
