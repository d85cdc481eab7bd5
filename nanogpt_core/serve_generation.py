"""Generation for ``gpt serve``: a bounded queue, worker threads and stop strings.

At most ``max_concurrency`` requests generate at once, each in a worker thread
(torch releases the GIL during a forward pass, so the event loop stays free);
up to ``queue_size`` more wait their turn in arrival order, and anything beyond
that is refused at once (:class:`QueueFull`, HTTP 429). Tokens travel from the
thread to the event loop one piece at a time; a consumer that goes away (a
client that disconnected) sets a flag the thread checks before every token, so
its slot is free again after at most one more forward pass.

Requests are not batched into one forward pass: each generates on its own,
with its own ``torch.Generator``, so concurrent outputs never mix.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs

from nanogpt_core.sampling import LoadedModel, stream_pieces


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full."""


@attrs.frozen(kw_only=True)
class Sampling:
    """How one request samples: OpenAI's parameters, already checked."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1


@attrs.frozen
class Piece:
    """New text of choice ``index``."""

    index: int
    text: str


@attrs.frozen
class Finish:
    """Choice ``index`` ended: ``reason`` is "stop" (end-of-text or a stop string) or "length"."""

    index: int
    reason: str
    completion_tokens: int


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back what might start one.

    Text that could be the beginning of a stop string is not released until
    the next piece shows whether it is, so a stop string never reaches the
    client, even split over several tokens.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to release now, and whether a stop string was met."""
        buffer = self.held + text
        cuts = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.held = ""
            return buffer[: min(cuts)], True
        keep = self._partial_stop(buffer)
        self.held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """What is still held back once generation ended without a stop string."""
        text, self.held = self.held, ""
        return text

    def _partial_stop(self, buffer: str) -> int:
        """Length of the longest end of ``buffer`` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if stop.startswith(buffer[-size:]):
                    longest = size
                    break
        return longest


def generate_choices(
    loaded: LoadedModel,
    ids: list[int],
    sampling: Sampling,
    emit: Callable[[Piece | Finish], None],
    cancelled: threading.Event,
) -> None:
    """Generate ``sampling.n`` choices one after another (in a worker thread).

    One generator, seeded by ``sampling.seed`` (random without one), serves
    every choice of the request, so a seeded request is reproducible.
    """
    import torch

    seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
    generator = torch.Generator(device=loaded.device).manual_seed(seed)
    for index in range(sampling.n):
        finish = _one_choice(loaded, ids, sampling, index, generator, emit, cancelled)
        if finish is None:
            return
        emit(finish)


def _one_choice(
    loaded: LoadedModel,
    ids: list[int],
    sampling: Sampling,
    index: int,
    generator: Any,
    emit: Callable[[Piece | Finish], None],
    cancelled: threading.Event,
) -> Finish | None:
    """Stream one choice through ``emit``; None when the consumer went away."""
    matcher = StopMatcher(sampling.stop)
    count = 0
    for new_ids, text in stream_pieces(
        loaded,
        ids,
        max_new_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        generator=generator,
    ):
        if cancelled.is_set():
            return None
        count += len(new_ids)
        released, stopped = matcher.feed(text)
        if released:
            emit(Piece(index, released))
        if stopped:
            return Finish(index, "stop", count)
    if cancelled.is_set():
        return None
    if rest := matcher.flush():
        emit(Piece(index, rest))
    # stream_pieces ends early only at the end-of-text token.
    return Finish(index, "stop" if count < sampling.max_tokens else "length", count)


_DONE = object()


class Engine:
    """Runs requests on a loaded model: bounded concurrency, a bounded queue, threads.

    Create it inside the event loop that serves requests (the server's startup).
    """

    def __init__(self, loaded: LoadedModel, *, max_concurrency: int, queue_size: int) -> None:
        self.loaded = loaded
        self.capacity = max_concurrency + queue_size
        self.admitted = 0
        self.slots = asyncio.Semaphore(max_concurrency)
        self.executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="gpt-serve")

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
        """Wait for a slot, then yield pieces and finishes as the worker thread makes them.

        Closing or cancelling this iterator stops the generation after at most
        one more token; the slot is released when the thread has stopped.
        """
        await self.slots.acquire()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: Piece | Finish) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def finished(future: asyncio.Future[None]) -> None:
            self.slots.release()
            error = None if future.cancelled() else future.exception()
            queue.put_nowait(error or _DONE)

        try:
            future = loop.run_in_executor(
                self.executor, generate_choices, self.loaded, ids, sampling, emit, cancelled
            )
        except BaseException:
            self.slots.release()
            raise
        future.add_done_callback(finished)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()

    def shutdown(self) -> None:
        """Stop the worker threads once their current work is done."""
        self.executor.shutdown(wait=False, cancel_futures=True)


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
