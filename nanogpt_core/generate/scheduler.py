"""Continuous batching: one thread owns the model and decodes every admitted row together.

Each step of :meth:`Scheduler.step` does, in order:

1. take the requests that arrived, drop rows whose client left, end rows past
   their time limit (``finish_reason: "length"``);
2. prefill at most ``prefill_chunk`` prompt tokens of the rows first in line
   (a chunk of a long prompt, or several short ones), each in the spare slot
   of the batched KV cache; a row whose prompt is done samples its first
   token and joins the batch;
3. one decode step: a forward pass of one token per batched row, every row at
   its own position, then one vectorised sampling step
   (:mod:`~nanogpt_core.generate.batch_sampling`) and one transfer of the new
   tokens; rows that finished leave and their slot is free at once.

So a long prompt costs the running streams one chunk per token, not the whole
prompt. A row with learned positions that fills ``block_size`` is prefilled
again from its last ``block_size // 2`` tokens (what ``GPT.next_logits`` does
for one sequence); with RoPE it slides one token at a time.

Isolation: whatever fails for one row (its generator, its sampling, decoding
its text) fails that row's request alone; only a forward pass that fails fails
the rows in it.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from typing import Any

import torch

from nanogpt_core.errors import PluginFault
from nanogpt_core.generate.batch_sampling import BatchSampler, RowSettings
from nanogpt_core.generate.sampling import LoadedModel
from nanogpt_core.generate.serve_generation import GenerationFailed, Job, Row
from nanogpt_core.model.batch_cache import (
    BatchKVCache,
    decode_mask,
    forward_rows,
    prefill_mask,
)

# Prompt tokens prefilled per step. On a CPU a 64-token chunk of GPT-2 small
# costs about one decode step of a full batch, so running streams slow down by
# about half while a long prompt arrives, instead of stopping.
PREFILL_CHUNK = 64


class EngineRow(Row):
    """A row as the scheduler sees it: its context, position and sampling generator."""

    def __init__(self, job: Job, index: int, loaded: LoadedModel, generator: Any) -> None:
        super().__init__(job, index, generator, loaded)
        block_size = loaded.model.config.block_size
        s = job.sampling
        self.settings = RowSettings(s.temperature, s.top_k, s.top_p, generator)
        self.context = list(job.ids[-block_size:])  # what the model sees, newest last
        self.to_prefill = list(self.context)
        self.prefilled = 0
        self.position = 0  # the place of the next token fed (absolute, for RoPE)
        self.next_token = 0  # sampled, not yet fed
        self.refilling = False


def row_generators(job: Job, device: torch.device) -> list[torch.Generator]:
    """One generator per choice: choice i of a seeded request is seeded ``seed + i``.

    Choice 0 takes the seed as it is (so a seeded request samples what ``gpt
    sample --seed`` does), and torch refuses a seed out of its range here; the
    others wrap around past 2**64 - 1.
    """
    seed = job.sampling.seed if job.sampling.seed is not None else secrets.randbits(63)
    return [
        torch.Generator(device=device).manual_seed(seed if i == 0 else (seed + i) % 2**64)
        for i in range(job.sampling.n)
    ]


class Scheduler:
    """The batch of one model: rows waiting, the row prefilling, the rows decoding."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch: int,
        prefill_chunk: int = PREFILL_CHUNK,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.loaded = loaded
        self.config = loaded.model.config
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.vocab_limit = loaded.tokenizer.vocab_size
        dtype = dtype or next(loaded.model.parameters()).dtype
        # Slots 0..max_batch-1 decode; the last one is where prompts are prefilled.
        self.spare = max_batch
        self.cache = BatchKVCache(self.config, max_batch + 1, loaded.device, dtype)
        self.waiting: deque[EngineRow] = deque()
        self.prefilling: EngineRow | None = None
        self.decoding: list[EngineRow] = []
        self.changed = True  # the decoding rows changed: rebuild their tensors
        self.largest_batch = 0
        self.device_tokens: torch.Tensor | None = None
        self.device_positions: torch.Tensor | None = None
        self.sampler: BatchSampler | None = None

    # -- rows in and out -----------------------------------------------------------

    def add(self, job: Job) -> None:
        """Queue every choice of ``job``; a job whose generators cannot be made fails alone."""
        try:
            generators = row_generators(job, self.loaded.device)
        except Exception as exc:
            self._fail(job, exc)
            return
        job.rows_left = job.sampling.n
        for index, generator in enumerate(generators):
            self.waiting.append(EngineRow(job, index, self.loaded, generator))

    @property
    def queued(self) -> int:
        """Rows waiting for a place in the batch (those being prefilled included)."""
        rows = sum(not row.refilling for row in list(self.waiting))  # read by /metrics
        return rows + (self.prefilling is not None and not self.prefilling.refilling)

    @property
    def busy(self) -> bool:
        """Whether any row is waiting, prefilling or decoding."""
        return bool(self.waiting or self.prefilling or self.decoding)

    def _fail(self, job: Job, exc: BaseException) -> None:
        """End ``job`` with ``exc`` (once); its other rows leave at the next check."""
        if job.failed:
            return
        job.failed = True
        job.cancelled.set()
        error = exc if isinstance(exc, PluginFault | GenerationFailed) else GenerationFailed(exc)
        job.done(error)

    def fail_all(self, exc: BaseException) -> None:
        """Fail every request in the batch or the line (the batch itself broke)."""
        for row in [*self.waiting, *self.decoding, *filter(None, [self.prefilling])]:
            self._fail(row.job, exc)
        self.waiting.clear()
        self.prefilling = None
        self.decoding = []
        self.changed = True

    def _row_done(self, row: EngineRow) -> None:
        """Count a finished row; the job is done when all its rows are."""
        job = row.job
        job.rows_left -= 1
        if job.rows_left == 0 and not job.failed:
            job.done(None)

    def _settle(self, row: EngineRow, token: int) -> None:
        """Give ``row`` its sampled token; a raise there fails its job only."""
        row.next_token = token
        row.context.append(token)
        if len(row.context) > 2 * self.config.block_size:
            del row.context[: -self.config.block_size]
        try:
            row.take(token)
        except Exception as exc:
            self._fail(row.job, exc)
            row.done = True
            return
        if row.done and not row.job.cancelled.is_set():
            self._row_done(row)

    def sweep(self, now: float) -> None:
        """Drop rows whose request is gone; end those past their deadline as "length"."""
        for row in [*self.waiting, *self.decoding, *filter(None, [self.prefilling])]:
            deadline = row.job.deadline
            if not row.done and not row.job.cancelled.is_set() and deadline and now > deadline:
                try:
                    row.finish("length")
                except Exception as exc:
                    self._fail(row.job, exc)
                    continue
                self._row_done(row)
        gone = [r for r in self.waiting if r.done or r.job.cancelled.is_set()]
        for row in gone:
            self.waiting.remove(row)
        if self.prefilling and (self.prefilling.done or self.prefilling.job.cancelled.is_set()):
            self.prefilling = None
        self._compact()

    def _compact(self, leaving: tuple[EngineRow, ...] = ()) -> None:
        """Take finished (and ``leaving``) rows out of the batch; the others move down a slot.

        A row's slot is its index in ``decoding``; sources only grow as targets
        do, so no row is overwritten before it moved.
        """
        keep = [
            (source, row)
            for source, row in enumerate(self.decoding)
            if row not in leaving and not row.done and not row.job.cancelled.is_set()
        ]
        if len(keep) == len(self.decoding):
            return
        for target, (source, row) in enumerate(keep):
            self.cache.copy_slot(source, target, min(row.position, self.config.block_size))
        self.decoding = [row for _, row in keep]
        self.changed = True

    # -- the step ------------------------------------------------------------------

    def step(self) -> None:
        """Prefill one chunk, then decode one token for every batched row."""
        self.sweep(time.monotonic())
        # Chunks keep running streams going; with none running, whole prompts at once.
        # Short prompts share a step's budget: the next row in line takes what is left.
        budget = self.prefill_chunk if self.decoding else self.config.block_size
        while budget > 0:
            if self.prefilling is None:
                if not self.waiting or len(self.decoding) >= self.max_batch:
                    break
                self.prefilling = self.waiting.popleft()
            budget -= self._prefill_chunk(self.prefilling, budget)
        if self.decoding:
            self._decode()

    @torch.no_grad()
    def _prefill_chunk(self, row: EngineRow, size: int) -> int:
        """Prefill up to ``size`` more tokens of ``row``; the tokens it took (all on failure)."""
        device = self.loaded.device
        start = row.prefilled
        chunk = row.to_prefill[start : start + size]
        idx = torch.tensor([chunk], dtype=torch.long, device=device)
        positions = torch.arange(start, start + len(chunk), device=device)[None, :]
        views = [self.cache.prefill_view(i, self.spare, start) for i in range(self.config.n_layer)]
        try:
            logits = forward_rows(
                self.loaded.model, idx, positions, views, prefill_mask(start, len(chunk), device)
            )
        except Exception as exc:
            self._fail(row.job, exc)
            self.prefilling = None
            return size
        row.prefilled += len(chunk)
        if row.prefilled < len(row.to_prefill):
            return len(chunk)
        self.prefilling = None
        row.position = row.prefilled
        (token,) = self._sample([row], logits)
        if not row.job.failed:
            self._settle(row, token)
        if not row.done and not row.job.cancelled.is_set():
            self._join(row)
        return len(chunk)

    def _join(self, row: EngineRow) -> None:
        """Move a prefilled row from the spare slot into the batch."""
        slot = len(self.decoding)
        self.cache.copy_slot(self.spare, slot, row.position)
        row.refilling = False
        self.decoding.append(row)
        self.changed = True
        self.largest_batch = max(self.largest_batch, len(self.decoding))

    def _sample(self, rows: list[EngineRow], logits: torch.Tensor) -> list[int]:
        """One token per row; a row whose sampling fails fails its request alone."""
        try:
            draw = BatchSampler([r.settings for r in rows], logits.device).sample(
                logits, self.vocab_limit
            )
        except Exception as exc:
            if len(rows) == 1:
                self._fail(rows[0].job, exc)
                return [0]
            return [self._sample([row], logits[b : b + 1])[0] for b, row in enumerate(rows)]
        self._fail_bad(rows, draw.bad)
        return draw.tokens

    def _fail_bad(self, rows: list[EngineRow], bad: list[bool]) -> None:
        """Fail the rows whose distribution was not finite (a temperature too small for float32)."""
        for row, flag in zip(rows, bad, strict=True):
            if flag:
                message = (
                    "sampling met probabilities that are not finite "
                    f"(temperature {row.settings.temperature:g})"
                )
                self._fail(row.job, FloatingPointError(message))

    def _needs_refill(self, row: EngineRow) -> bool:
        """Learned positions past ``block_size``: start again from half a window."""
        return self.config.position == "learned" and row.position >= self.config.block_size

    @torch.no_grad()
    def _decode(self) -> None:
        block_size = self.config.block_size
        refill = tuple(r for r in self.decoding if self._needs_refill(r))
        for row in refill:  # first in line: back in the batch after one prefill
            row.to_prefill = row.context[-(block_size // 2) :]
            row.prefilled = 0
            row.refilling = True
            self.waiting.appendleft(row)
        self._compact(refill)
        if not self.decoding:
            return
        device, rows = self.loaded.device, self.decoding
        if self.changed:
            self.device_tokens = torch.tensor([r.next_token for r in rows], device=device)
            self.device_positions = torch.tensor([r.position for r in rows], device=device)
            self.sampler = BatchSampler([r.settings for r in rows], device)
            self.changed = False
        filled = [min(r.position + 1, block_size) for r in rows]
        span = max(filled)
        positions = self.device_positions
        mask = None
        if min(filled) != span:
            mask = decode_mask((positions + 1).clamp(max=block_size), span)
        write = positions % block_size  # past block_size (RoPE), the oldest place
        index = torch.arange(len(rows), device=device)
        views = [self.cache.decode_view(i, index, write, span) for i in range(self.config.n_layer)]
        try:
            logits = forward_rows(
                self.loaded.model, self.device_tokens[:, None], positions[:, None], views, mask
            )
        except Exception as exc:
            for row in rows:
                self._fail(row.job, exc)
            self._compact()
            return
        tokens = self._sample_batch(rows, logits)
        self.device_positions = positions + 1
        for row, token in zip(rows, tokens, strict=True):
            row.position += 1
            if not row.job.failed:
                self._settle(row, token)
        self._compact()

    def _sample_batch(self, rows: list[EngineRow], logits: torch.Tensor) -> list[int]:
        """The batch's tokens through its cached sampler; row by row when that raises."""
        assert self.sampler is not None
        try:
            draw = self.sampler.sample(logits, self.vocab_limit)
        except Exception:
            self.changed = True  # the device tokens are rebuilt from the host's
            return self._sample(rows, logits)
        self.device_tokens = draw.on_device
        self._fail_bad(rows, draw.bad)
        return draw.tokens


def run_jobs(loaded: LoadedModel, jobs: list[Job], max_batch: int = 8, **options: Any) -> int:
    """Run ``jobs`` to the end in this thread (tests, benchmarks); the largest batch it made."""
    scheduler = Scheduler(loaded, max_batch=max_batch, **options)
    for job in jobs:
        scheduler.add(job)
    while scheduler.busy:
        scheduler.step()
    return scheduler.largest_batch
