"""Generation for ``gpt serve``: a bounded queue, worker threads and stop strings.

At most ``max_concurrency`` requests generate at once, each in a worker thread
(torch releases the GIL during a forward pass, so the event loop stays free);
up to ``queue_size`` more wait their turn in arrival order, and anything beyond
that is refused at once (:class:`QueueFull`, HTTP 429). Tokens travel from the
thread to the event loop one piece at a time; a consumer that goes away (a
client that disconnected) sets a flag the thread checks before every token, so
its slot is free again after at most one more forward pass.

Requests are batched where the shapes allow: when a slot frees, the request
first in line is joined by the others waiting with a prompt of the same length
(up to ``max_batch`` of them), and all their choices decode together, one
forward pass per token over a batched KV cache. Each request keeps its own
``torch.Generator`` and sampling settings, so concurrent outputs never mix.
Prompts of other lengths wait for the next slot: with learned absolute
positions, rows of different lengths would need padding and masks.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs

from nanogpt_core.generate.sampling import LoadedModel


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


@attrs.define(eq=False)
class Job:
    """One admitted request as the engine sees it: prompt, settings, where results go."""

    ids: list[int]
    sampling: Sampling
    emit: Callable[[Piece | Finish], None]
    done: Callable[[BaseException | None], None]
    cancelled: threading.Event = attrs.field(factory=threading.Event)


class Row:
    """One choice of one job in a batch: decodes its tokens and emits its text."""

    def __init__(self, job: Job, index: int, generator: Any, loaded: LoadedModel) -> None:
        self.job = job
        self.index = index
        self.generator = generator
        self.tokenizer = loaded.tokenizer
        self.matcher = StopMatcher(job.sampling.stop)
        self.pending: list[int] = []
        self.count = 0
        self.done = False

    def take(self, token: int) -> None:
        """Add one sampled token: emit what text is ready, finish at a stop or the limit."""
        if self.job.cancelled.is_set():
            self.done = True
            return
        eot = self.tokenizer.eot_id
        if eot is not None and token == eot:
            self._finish("stop")
            return
        self.count += 1
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        # A BPE token can end inside a multi-byte character: wait for the rest.
        if not text.endswith("\ufffd"):
            self.pending = []
            released, stopped = self.matcher.feed(text)
            if released:
                self.job.emit(Piece(self.index, released))
            if stopped:
                self.done = True
                self.job.emit(Finish(self.index, "stop", self.count))
                return
        if self.count >= self.job.sampling.max_tokens:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        rest = self.matcher.feed(self.tokenizer.decode(self.pending))[0] if self.pending else ""
        rest += self.matcher.flush()
        if rest:
            self.job.emit(Piece(self.index, rest))
        self.done = True
        self.job.emit(Finish(self.index, reason, self.count))


def make_rows(loaded: LoadedModel, jobs: list[Job]) -> list[Row]:
    """Every choice of every job; a job's choices share its generator (seeded when asked)."""
    import torch

    rows = []
    for job in jobs:
        seed = job.sampling.seed if job.sampling.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=loaded.device).manual_seed(seed)
        rows.extend(Row(job, index, generator, loaded) for index in range(job.sampling.n))
    return rows


def generate_batch(loaded: LoadedModel, jobs: list[Job]) -> None:
    """Decode every choice of ``jobs`` (prompts of one length) together, in a worker thread.

    The same steps as ``GPT.generate_tokens``: the prompt through the KV cache,
    then one token per forward pass (``GPT.next_logits``, which also decides how
    the window moves past ``block_size``). Each row samples with its own settings
    and generator; rows that finished (or whose client left) ride along until
    all are done.
    """
    import torch

    from nanogpt_core.model.kv_cache import KVCache
    from nanogpt_core.model.next_token import pick_next_token

    model, rows = loaded.model, make_rows(loaded, jobs)
    config, limit = model.config, loaded.tokenizer.vocab_size
    ids = torch.tensor([row.job.ids for row in rows], dtype=torch.long, device=loaded.device)
    ids = ids[:, -config.block_size :]
    filler = loaded.tokenizer.eot_id or 0
    with torch.no_grad():
        cache: KVCache | None = KVCache(config)
        logits, _ = model(ids, cache=cache)
        while not all(row.done for row in rows):
            chosen = []
            for b, row in enumerate(rows):
                if row.done:
                    chosen.append(filler)
                    continue
                s = row.job.sampling
                token = pick_next_token(
                    logits[b : b + 1, -1, :], s.temperature, s.top_k, s.top_p, row.generator, limit
                )
                chosen.append(int(token))
                row.take(int(token))
            if all(row.done for row in rows):
                return
            step = torch.tensor(chosen, dtype=torch.long, device=loaded.device).view(-1, 1)
            ids = torch.cat((ids, step), dim=1)
            logits, cache = model.next_logits(ids, cache)


_DONE = object()
# Requests decoded together at most: past this a batch's per-token cost grows
# faster than what waiting requests gain on a CPU.
MAX_BATCH = 8


class Engine:
    """Runs requests on a loaded model: bounded concurrency and queue, batching, threads.

    Create it inside the event loop that serves requests (the server's startup).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_concurrency: int,
        queue_size: int,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.loaded = loaded
        self.capacity = max_concurrency + queue_size
        self.admitted = 0
        self.max_concurrency = max_concurrency
        self.max_batch = max_batch
        self.running = 0
        self.waiting: list[Job] = []
        self.largest_batch = 0
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

        Closing or cancelling this iterator stops this request's generation
        after at most one more token; a batch whose requests all left stops too,
        and its slot goes to the next in line.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(item: Piece | Finish) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def done(error: BaseException | None) -> None:
            queue.put_nowait(error or _DONE)

        job = Job(ids, sampling, emit, done)
        self.waiting.append(job)
        self._dispatch(loop)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()
            if job in self.waiting:
                self.waiting.remove(job)

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start batches while slots are free: the first in line and its equal-length peers."""
        while self.running < self.max_concurrency and self.waiting:
            head = self.waiting.pop(0)
            group = [head]
            for job in list(self.waiting):
                if len(group) >= self.max_batch:
                    break
                if len(job.ids) == len(head.ids):
                    group.append(job)
                    self.waiting.remove(job)
            self.running += 1
            self.largest_batch = max(self.largest_batch, len(group))
            future = loop.run_in_executor(self.executor, generate_batch, self.loaded, group)
            future.add_done_callback(lambda f, group=group: self._finished(loop, f, group))

    def _finished(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], group: list[Job]
    ) -> None:
        self.running -= 1
        error = None if future.cancelled() else future.exception()
        for job in group:
            job.done(error)
        self._dispatch(loop)

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
