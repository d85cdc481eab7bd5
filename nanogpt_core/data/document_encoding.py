"""Tokenizing a stream of documents in batches, in worker processes when that pays.

Documents are grouped per split into batches of about :data:`BATCH_CHARS`
characters. A tokenizer that says it is ``parallel`` (its encoding holds the GIL
and it can be copied into worker processes) encodes them in a pool of forked
worker processes, a few batches in flight at a time so memory stays bounded;
any other, or an input of one or two batches, is encoded in this process. Each split's batches come back in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from nanogpt_core.data.plugins import plugin_call
from nanogpt_core.data.prepared import SPLITS
from nanogpt_core.data.tokenizers import Tokenizer, encode_documents
from nanogpt_core.errors import NanoGPTError

# Documents are tokenized in batches of about this many characters: large enough
# to keep worker processes busy, small enough to bound memory.
BATCH_CHARS = 500_000
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

Batch = tuple[str, list[str]]


def encode_batches(
    tokenizer: Tokenizer,
    stream: Iterable[tuple[str, str]],
    counts: dict[str, dict[str, int]],
    who: str,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(split, token ids)`` a batch at a time, each split's batches in order.

    ``counts[split]`` gets each document's ``documents`` and ``characters`` as it
    is read; ``who`` names the tokenizer in the line a fault of it becomes.
    """
    batches = _document_batches(stream, counts)
    first = next(batches, None)
    second = next(batches, None) if first is not None else None
    if not getattr(tokenizer, "parallel", False) or second is None:
        # In-process: the tokenizer does its own threading (Hugging Face), or the
        # input is so small that worker processes would cost more than they save.
        for split, batch in itertools.chain(filter(None, [first, second]), batches):
            with plugin_call(who, "encode"):
                ids = encode_documents(tokenizer, batch)
            yield split, ids
        return
    yield from _encode_in_pool(tokenizer, itertools.chain([first, second], batches), who)


def _document_batches(
    stream: Iterable[tuple[str, str]], counts: dict[str, dict[str, int]]
) -> Iterator[Batch]:
    """Group each split's documents into batches of about BATCH_CHARS characters."""
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for split, document in stream:
        counts[split]["documents"] += 1
        counts[split]["characters"] += len(document)
        pending[split].append(document)
        sizes[split] += len(document)
        if sizes[split] >= BATCH_CHARS:
            yield split, pending[split]
            pending[split], sizes[split] = [], 0
    for split in SPLITS:
        if pending[split]:
            yield split, pending[split]


# Worker processes. Each is forked with the tokenizer already built (fork copies
# it); with spawn, initargs pickle it.
_WORKER_TOKENIZER: Any = None


def _start_worker(parent_pid: int, tokenizer: Tokenizer) -> None:
    """Pool initializer: die with the parent, let go of its output, ignore Ctrl-C."""
    if sys.platform.startswith("linux"):
        # The kernel kills this worker when the parent dies, even by SIGKILL.
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    # A worker must not keep a caller's pipes open (`gpt prepare | tee log` would
    # never see EOF if the parent were killed); results travel through the pool.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    # Ctrl-C reaches the whole process group; the parent alone decides what to do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(texts: list[str]) -> np.ndarray:
    return encode_documents(_WORKER_TOKENIZER, texts)


def _encode_in_pool(
    tokenizer: Tokenizer, batches: Iterable[Batch], who: str
) -> Iterator[tuple[str, np.ndarray]]:
    """Encode in worker processes, keeping only a few batches in flight so memory stays bounded."""
    workers = max(1, os.cpu_count() or 1)
    # fork where there is one: spawn would re-import the caller's __main__.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_start_worker,
        initargs=(os.getpid(), tokenizer),
    )
    pending: deque[tuple[str, Future[np.ndarray]]] = deque()
    try:
        for split, batch in batches:
            pending.append((split, pool.submit(_encode_in_worker, batch)))
            if len(pending) >= 4 * workers:
                yield _result(pending.popleft(), who)
        while pending:
            yield _result(pending.popleft(), who)
    except BaseException:
        # Ctrl-C, a fault, or the consumer gave up: drop the queued batches rather
        # than encode them all before stopping.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _result(item: tuple[str, Future[np.ndarray]], who: str) -> tuple[str, np.ndarray]:
    split, future = item
    try:
        with plugin_call(who, "encode (in a worker process)"):
            return split, future.result()
    except BrokenProcessPool as exc:
        raise NanoGPTError(
            f"a tokenizer worker process died ({exc}); out of memory? run `gpt prepare` again"
        ) from exc
