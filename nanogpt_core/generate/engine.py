"""The serving engine: admission, the waiting line, and the thread that owns the model.

:class:`Engine` is the asyncio side of continuous batching. A request is
admitted (:meth:`Engine.admit`; at most ``max_batch + max_queue`` at once,
:class:`QueueFull` beyond), then :meth:`Engine.generate` hands it to the one
scheduler thread (:mod:`~nanogpt_core.generate.scheduler`), which prefills it
and decodes it together with every other row, whatever their lengths. Pieces of
text come back to the event loop one at a time; closing the iterator (a client
that left) cancels the request, and its rows leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from nanogpt_core.generate.sampling import LoadedModel
from nanogpt_core.generate.scheduler import PREFILL_CHUNK, Scheduler
from nanogpt_core.generate.serve_generation import Finish, Job, Piece, QueueFull, Sampling

# Rows decoded together at most. On a CPU a decode step of 8 rows costs little
# more than one of a single row (reading the weights dominates); on a GPU many
# more fit, as memory allows (see serve_memory.py).
MAX_BATCH = 8
# Requests that may wait for a place in the batch; more get HTTP 429.
MAX_QUEUE = 16

_DONE = object()


class Engine:
    """Runs requests on a loaded model: admission, a waiting line, one batching thread.

    Create it inside the event loop that serves requests (the server's startup).

    :param max_batch: rows (choices) decoding together at most.
    :param max_queue: requests admitted beyond those decoding, waiting their turn.
    :param prefill_chunk: prompt tokens prefilled per step, between decode steps.
    :param request_timeout: seconds after which a request's rows end as "length".
    :param dtype: the KV cache's dtype; the model's when None.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch: int = MAX_BATCH,
        max_queue: int = MAX_QUEUE,
        prefill_chunk: int = PREFILL_CHUNK,
        request_timeout: float | None = None,
        dtype: Any = None,
    ) -> None:
        self.loaded = loaded
        self.capacity = max_batch + max_queue
        self.admitted = 0
        self.request_timeout = request_timeout
        self.scheduler = Scheduler(
            loaded, max_batch=max_batch, prefill_chunk=prefill_chunk, dtype=dtype
        )
        self.inbox: list[Job] = []
        self.wake = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="gpt-serve-batch", daemon=True)
        self.thread.start()

    @property
    def queue_depth(self) -> int:
        """Rows (choices) admitted and waiting for a place in the batch (for /metrics)."""
        return sum(job.sampling.n for job in list(self.inbox)) + self.scheduler.queued

    @property
    def batch_size(self) -> int:
        """Rows decoding now (for /metrics)."""
        return len(self.scheduler.decoding)

    @property
    def largest_batch(self) -> int:
        """The most rows that decoded together so far."""
        return self.scheduler.largest_batch

    def admit(self) -> Ticket:
        """A place in line for one request; :class:`QueueFull` when there is none."""
        if self.admitted >= self.capacity:
            raise QueueFull(
                f"the server is busy: {self.capacity} requests are generating or waiting; "
                "try again later"
            )
        self.admitted += 1
        return Ticket(self)

    async def generate(self, ids: list[int], sampling: Sampling) -> AsyncIterator[Piece | Finish]:
        """Yield the request's pieces and finishes as the scheduler makes them.

        Closing or cancelling this iterator cancels the request: its rows leave
        the batch (or the line) at the scheduler's next step. This is how a
        server stops a request whose client disconnected, streamed or not.
        A failure of this request alone raises
        :class:`~nanogpt_core.generate.serve_generation.GenerationFailed` (or
        the plugin's ``PluginFault``) here, after the pieces made before it.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(item: Piece | Finish) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def done(error: BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, error or _DONE)

        timeout = self.request_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        job = Job(ids, sampling, emit, done, deadline=deadline)
        with self.wake:
            self.inbox.append(job)
            self.wake.notify()
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()

    def _run(self) -> None:
        """The scheduler thread: take new requests, step the batch, sleep when idle."""
        scheduler = self.scheduler
        while True:
            with self.wake:
                while not (self.stopped or self.inbox or scheduler.busy):
                    # Woken by a new request; the timeout re-checks cancellations.
                    self.wake.wait(timeout=1.0)
                if self.stopped:
                    return
                jobs, self.inbox = self.inbox, []
            for job in jobs:
                scheduler.add(job)
            try:
                scheduler.step()
            except Exception as exc:
                print(f"Error: the batch failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                scheduler.fail_all(exc)

    def shutdown(self) -> None:
        """Stop the scheduler thread after its current step."""
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=10)


class Ticket:
    """One admitted request's place; :meth:`release` (idempotent) gives it back."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.held = True

    def release(self) -> None:
        """Give the place back (safe to call more than once)."""
        if self.held:
            self.held = False
            self.engine.admitted -= 1
