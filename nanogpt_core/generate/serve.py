"""``gpt serve``: an OpenAI-compatible HTTP server for a checkpoint.

:func:`create_app` builds the FastAPI application (tests build it in-process
too); :func:`serve` loads a checkpoint and runs it under uvicorn. Generation
itself (admission, continuous batching, stop strings) is in
:mod:`nanogpt_core.generate.engine` and the modules it names, answering (whole or
streamed) in :mod:`nanogpt_core.generate.serve_answers`, the request bodies and chat rendering in
:mod:`nanogpt_core.generate.serve_api`, the error answers in
:mod:`nanogpt_core.generate.serve_errors`, ``/metrics`` in
:mod:`nanogpt_core.generate.serve_metrics`, the socket and the shutdown in
:mod:`nanogpt_core.generate.serve_startup`.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.resources
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from nanogpt_core.data.templates import Template
from nanogpt_core.generate.engine import MAX_BATCH, MAX_QUEUE, Engine
from nanogpt_core.generate.openai_shapes import ChatShape, CompletionShape
from nanogpt_core.generate.sampling import LoadedModel, encode_prompt
from nanogpt_core.generate.scheduler import PREFILL_CHUNK
from nanogpt_core.generate.serve_answers import respond
from nanogpt_core.generate.serve_api import (
    PLAIN_STOP,
    ChatBody,
    CompletionBody,
    SamplingBody,
    plain_context,
    template_context,
)
from nanogpt_core.generate.serve_errors import APIError, add_error_handlers
from nanogpt_core.generate.serve_generation import Sampling
from nanogpt_core.generate.serve_metrics import CountRequests, Metrics

# OpenAI's legacy completions default; chat answers run to end-of-text or block_size.
COMPLETION_MAX_TOKENS = 16
# --max-tokens-limit's default, in block_size windows: past its block_size a model
# continues from a sliding window (each token then costs a window's attention), and a
# few windows are as far as a model's text stays coherent; the cap keeps one request
# from holding a row for hours (max_tokens 10**9).
MAX_TOKENS_BLOCKS = 4
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
    """ASGI middleware: ``/v1/`` (and ``/metrics``) need ``Authorization: Bearer KEY`` (else 401)."""

    def __init__(self, app: Any, api_key: str, protected: tuple[str, ...] = ("/v1/",)) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.protected = protected

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Answer 401 for a wrong or missing key; pass everything else on."""
        if scope["type"] == "http" and scope["path"].startswith(self.protected):
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
    max_tokens_limit: int | None = None,
    metrics_public: bool = False,
) -> FastAPI:
    """The FastAPI application serving ``loaded`` (chat through ``template`` when given).

    Without a template, chat completions see a plain "User: ... / Assistant:"
    transcript and stop at a new "User:" line. The batching options are
    :class:`~nanogpt_core.generate.engine.Engine`'s. ``max_tokens_limit`` caps a
    request's ``max_tokens`` (default :data:`MAX_TOKENS_BLOCKS` times the
    model's ``block_size``); ``/metrics`` needs the API key unless
    ``metrics_public``.
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
    app.state.engine = None
    metrics = Metrics(lambda: app.state.engine)
    app.state.metrics = metrics
    if api_key:
        protected = ("/v1/",) if metrics_public else ("/v1/", "/metrics")
        app.add_middleware(RequireKey, api_key=api_key, protected=protected)
    # Added last, so outside the key check: 401s are counted too.
    app.add_middleware(CountRequests, metrics=metrics)
    add_error_handlers(app)
    if max_tokens_limit is None:
        max_tokens_limit = MAX_TOKENS_BLOCKS * int(loaded.model.config.block_size)
    served = Served(loaded, template, model_name, max_tokens_limit)
    _add_routes(app, served)
    return app


class Served:
    """What a request needs: the model, its chat template, its public name, the token cap."""

    def __init__(
        self, loaded: LoadedModel, template: Template | None, name: str, max_tokens_limit: int
    ) -> None:
        self.loaded = loaded
        self.template = template
        self.name = name
        self.max_tokens_limit = max_tokens_limit

    def check_model(self, body: SamplingBody) -> None:
        """Refuse a request for another model (no model given is fine)."""
        if body.model is not None and body.model != self.name:
            raise APIError(
                400,
                f"model {body.model!r} does not exist; this server has {self.name!r}",
                param="model",
                code="model_not_found",
            )

    def sampling(
        self, body: SamplingBody, max_tokens: int | None, default: int, field: str = "max_tokens"
    ) -> Sampling:
        """The sampling parameters of a request, defaults filled in, ``max_tokens`` capped.

        The body's own checks ran already (every number finite and in range);
        the cap depends on the server, so it is checked here, still before the
        request is admitted.
        """
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise APIError(
                400,
                f"{field}: {max_tokens} is more than this server's limit of "
                f"{self.max_tokens_limit} (gpt serve --max-tokens-limit)",
                param=field,
                code="max_tokens_exceeded",
            )
        return Sampling(
            max_tokens=max_tokens or min(default, self.max_tokens_limit),
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

    @app.get("/metrics")
    async def metrics() -> Response:
        recorded: Metrics = app.state.metrics
        if not recorded.enabled:
            raise APIError(
                404,
                "/metrics needs prometheus_client: pip install 'nanogpt[serve]'",
                code="metrics_unavailable",
            )
        text, content_type = recorded.exposition()
        return Response(text, media_type=content_type)

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
        field = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
        max_tokens = body.max_completion_tokens or body.max_tokens
        sampling = served.sampling(body, max_tokens, block_size, field)
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
    prepack: bool = True,
    grace: float,
    device: str,
    max_tokens_limit: int | None = None,
    metrics_public: bool = False,
) -> None:
    """What ``gpt serve`` does: load the checkpoint and serve it until SIGTERM or Ctrl-C.

    The key and the address are checked, and the port taken, before the
    checkpoint loads: each way of failing to start is one line, exit 2. With
    ``prepack`` a float32 model on the CPU decodes through oneDNN
    (:func:`~nanogpt_core.model.packed_linear.pack_linears`).
    """
    import click
    import uvicorn

    from nanogpt_core.generate.sampling import contained_from_description, load_model
    from nanogpt_core.generate.serve_memory import check_kv_fits, resolve_dtype, to_dtype
    from nanogpt_core.generate.serve_startup import (
        CutAtShutdown,
        bind_socket,
        check_api_key,
        quiet_uvicorn,
    )
    from nanogpt_core.model.packed_linear import pack_linears
    from nanogpt_core.plugins.registry import load_plugins

    check_api_key(api_key)
    sock = bind_socket(host, port)
    port = sock.getsockname()[1]  # the one the system chose for --port 0
    plugins = load_plugins()
    loaded = load_model(ckpt, device, plugins)
    precision = resolve_dtype(dtype, loaded.device)
    to_dtype(loaded.model, precision)  # the KV cache takes the model's dtype
    # Checked with the weights on the device: what is free is what the cache gets.
    check_kv_fits(loaded.model.config, max_batch, precision, loaded.device)
    packed = pack_linears(loaded.model, max_batch) if prepack else 0
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
        max_tokens_limit=max_tokens_limit,
        metrics_public=metrics_public,
    )
    chat = f"template {loaded.template.get('kind')!r}" if loaded.template else "plain transcript"
    click.echo(
        f"serving {ckpt} as model {name!r} ({chat}) on http://{host}:{port}/ "
        f"(batch {max_batch}, queue {max_queue}, {str(precision).removeprefix('torch.')}"
        f"{f', {packed} linear layers prepacked for oneDNN' if packed else ''})",
        err=True,
    )
    config = uvicorn.Config(
        CutAtShutdown(app), log_level="warning", timeout_graceful_shutdown=grace
    )
    quiet_uvicorn()
    # uvicorn shuts down gracefully on SIGTERM/SIGINT and then raises the signal
    # again under the handler it found: make that handler a no-op, so a server
    # stopped on purpose exits 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
