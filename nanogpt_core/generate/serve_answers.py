"""How ``gpt serve`` answers a request: whole, or streamed as server-sent events.

Both take a place in the engine's line first (:meth:`Engine.admit`, a 429 when
there is none) and give it back however they end; both pass the engine's items
through :meth:`Metrics.timed`. A stream notices a client that left when writing
to it; a whole answer watches the connection while it waits, so either way the
request's generation is cancelled (its iterator closed) and its rows freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nanogpt_core.errors import PluginFault
from nanogpt_core.generate.engine import Engine, Ticket
from nanogpt_core.generate.openai_shapes import CompletionShape, usage
from nanogpt_core.generate.serve_api import SamplingBody
from nanogpt_core.generate.serve_errors import server_fault
from nanogpt_core.generate.serve_generation import (
    Finish,
    GenerationFailed,
    Piece,
    Sampling,
)
from nanogpt_core.generate.serve_metrics import CLIENT_CLOSED, Metrics

TRUNCATED_HEADER = "X-Nanogpt-Prompt-Truncated"
# How often a non-streamed request looks whether its client is still there.
DISCONNECT_POLL_S = 0.1


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


async def respond(
    request: Request,
    body: SamplingBody,
    ids: list[int],
    dropped: int,
    sampling: Sampling,
    shape: CompletionShape,
) -> Any:
    """Queue the request, then answer it whole or as server-sent events.

    A non-streamed request is cancelled when its client goes away, as a stream
    is: its rows stop and its place goes to the next request.
    """
    arrived = time.perf_counter()
    engine: Engine = request.app.state.engine
    metrics: Metrics = request.app.state.metrics
    ticket = engine.admit()
    metrics.count_prompt(len(ids))
    headers = {TRUNCATED_HEADER: str(dropped)} if dropped else {}
    head = {
        "id": f"{shape.prefix}-{secrets.token_hex(12)}",
        "created": int(time.time()),
        "model": shape.model,
    }
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        items = metrics.timed(engine.generate(ids, sampling), arrived)
        events = _events(items, ids, shape, head, include_usage)
        return TicketedStream(ticket, events, headers)
    try:
        items = metrics.timed(engine.generate(ids, sampling), arrived)
        answer = await _unless_gone(request, _whole(items, ids, sampling, shape, head))
    finally:
        ticket.release()
    if answer is None:  # nobody reads this; it is counted as the client's going
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(answer, headers=headers)


async def _unless_gone(request: Request, answer: Any) -> dict[str, Any] | None:
    """Await ``answer``, or cancel it (closing its generation) when the client goes: None.

    Only a stream notices a client that left by writing to it; a whole answer
    is written once, at the end, so the connection is watched meanwhile.
    """
    task = asyncio.ensure_future(answer)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
        return task.result()
    finally:
        task.cancel()  # a no-op once done; else our own cancellation (shutdown) reaches it


async def _whole(
    items: AsyncIterator[Piece | Finish],
    ids: list[int],
    sampling: Sampling,
    shape: CompletionShape,
    head: dict,
) -> dict[str, Any]:
    texts = [""] * sampling.n
    choices: list[dict[str, Any]] = []
    generated = 0
    async with contextlib.aclosing(items) as items:
        async for item in items:
            if isinstance(item, Piece):
                texts[item.index] += item.text
            else:
                generated += item.completion_tokens
                choices.append(shape.final(item.index, texts[item.index], item.reason))
    return {**head, "object": shape.whole, "choices": choices, "usage": usage(len(ids), generated)}


async def _events(
    items: AsyncIterator[Piece | Finish],
    ids: list[int],
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
    async with contextlib.aclosing(items) as items:
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
