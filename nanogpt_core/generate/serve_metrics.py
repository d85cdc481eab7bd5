"""``gpt serve``'s ``/metrics``: Prometheus counters, gauges and histograms of one server.

Each app has its own :class:`prometheus_client.CollectorRegistry` (tests start
many apps in one process, and a global registry refuses a metric registered
twice). Requests are counted by route and status by an ASGI middleware, so 401s,
400s and 429s count too; tokens and latencies are recorded where the answer is
built (:mod:`nanogpt_core.generate.serve`); the queue depth and the batch size
are read from the engine at scrape time. Without ``prometheus_client`` (it comes
with the ``serve`` extra) nothing is recorded and ``/metrics`` answers 404 saying
what to install.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from nanogpt_core.generate.serve_generation import Finish, Piece

# Routes counted by name; any other path is "other", so a scanner probing random
# paths cannot grow the number of series without bound.
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/", "/metrics")
# Seconds. Time to first token spans a short prompt on a GPU to a long queue on a
# CPU; the gap between tokens is milliseconds on a GPU, tens of them on a CPU.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# A non-streamed request whose client went away before its answer (nginx's code).
CLIENT_CLOSED = 499


class Metrics:
    """One server's metrics; every method is a no-op without ``prometheus_client``.

    :param engine: called at scrape time for the engine (it is created at startup).
    """

    def __init__(self, engine: Callable[[], Any]) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            self.registry = None
            return
        self.registry = prom.CollectorRegistry()
        registry = self.registry
        self.requests = prom.Counter(
            "nanogpt_requests",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.prompt_tokens = prom.Counter(
            "nanogpt_prompt_tokens", "Prompt tokens of requests admitted.", registry=registry
        )
        self.completion_tokens = prom.Counter(
            "nanogpt_completion_tokens",
            "Tokens generated, counted when each choice finishes.",
            registry=registry,
        )
        self.ttft = prom.Histogram(
            "nanogpt_time_to_first_token_seconds",
            "From a request's arrival to its first text.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = prom.Histogram(
            "nanogpt_inter_token_latency_seconds",
            "Between consecutive pieces of text of one choice (a piece is one token "
            "unless a character or a possible stop string spans tokens).",
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        registry.register(_EngineGauges(engine))

    @property
    def enabled(self) -> bool:
        """Whether ``prometheus_client`` is installed, so something is recorded."""
        return self.registry is not None

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every metric, and its content type."""
        import prometheus_client as prom

        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST

    def count_request(self, path: str, status: int) -> None:
        """One answered request."""
        if self.enabled:
            route = path if path in ROUTES else "other"
            self.requests.labels(route=route, status=str(status)).inc()

    def count_prompt(self, tokens: int) -> None:
        """An admitted request's prompt tokens."""
        if self.enabled:
            self.prompt_tokens.inc(tokens)

    async def timed(
        self, items: AsyncIterator[Piece | Finish], arrived: float
    ) -> AsyncIterator[Piece | Finish]:
        """``items`` passed through, timing the first text and the gaps between pieces.

        Closing this closes ``items`` too: closing is how a request's
        generation is cancelled.
        """
        last: dict[int, float] = {}
        first = True
        async with contextlib.aclosing(items):
            async for item in items:
                now = time.perf_counter()
                if isinstance(item, Piece) and self.enabled:
                    if first:
                        self.ttft.observe(now - arrived)
                        first = False
                    if item.index in last:
                        self.itl.observe(now - last[item.index])
                    last[item.index] = now
                elif isinstance(item, Finish) and self.enabled:
                    self.completion_tokens.inc(item.completion_tokens)
                yield item


class _EngineGauges:
    """A collector reading the engine's queue depth and batch size when scraped."""

    def __init__(self, engine: Callable[[], Any]) -> None:
        self.engine = engine

    def collect(self) -> Any:
        """``nanogpt_queue_depth`` and ``nanogpt_batch_size`` now."""
        from prometheus_client.core import GaugeMetricFamily

        engine = self.engine()
        depth, rows = (0, 0) if engine is None else engine_load(engine)
        yield GaugeMetricFamily(
            "nanogpt_queue_depth", "Requests admitted and waiting to join the batch.", value=depth
        )
        yield GaugeMetricFamily(
            "nanogpt_batch_size", "Rows (request choices) decoding now.", value=rows
        )


def engine_load(engine: Any) -> tuple[int, int]:
    """The engine's queue depth and batch size (:class:`~nanogpt_core.generate.engine.Engine`)."""
    return int(engine.queue_depth), int(engine.batch_size)


class CountRequests:
    """ASGI middleware: counts every HTTP response by route and status as it starts."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Pass the request on, noting the status of the response it gets."""
        if scope["type"] != "http" or not self.metrics.enabled:
            await self.app(scope, receive, send)
            return

        async def noting(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_request(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, noting)
