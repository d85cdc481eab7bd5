"""What ``gpt serve`` generates for: requests, their rows, and the text each row emits.

A request (:class:`Job`) has ``n`` choices; each is a :class:`Row` of the
batch, which turns its sampled tokens into text pieces, cuts them at stop
strings (:class:`StopMatcher`) and reports how it finished. The batch itself
is :mod:`~nanogpt_core.generate.scheduler`'s; the asyncio side (admission, the
queue, the scheduler thread) is :mod:`~nanogpt_core.generate.engine`'s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import attrs

from nanogpt_core.generate.sampling import LoadedModel


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full."""


class GenerationFailed(Exception):
    """Generating one request failed (its sampling, its generator): that request alone.

    The message names what failed; the cause is chained. ``gpt serve`` answers
    it with HTTP 500 and OpenAI's error object (an error event mid-stream).
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"generation failed: {type(cause).__name__}: {cause}")
        self.__cause__ = cause


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
    deadline: float | None = None  # time.monotonic() past which its rows end as "length"
    rows_left: int = 0  # choices not finished yet (the scheduler counts them down)
    failed: bool = False


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
            self.finish("stop")
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
            self.finish("length")

    def finish(self, reason: str) -> None:
        """End this choice now: release the text held back, then its :class:`Finish`."""
        rest = self.matcher.feed(self.tokenizer.decode(self.pending))[0] if self.pending else ""
        rest += self.matcher.flush()
        if rest:
            self.job.emit(Piece(self.index, rest))
        self.done = True
        self.job.emit(Finish(self.index, reason, self.count))
