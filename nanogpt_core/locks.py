"""One writer per folder: an OS lock that dies with its holder.

``gpt run`` locks its results folder and ``gpt prepare`` its data folder with
``fcntl.flock``. The kernel releases such a lock when the holding process ends,
however it ends (even ``kill -9``), so a stale lock never blocks anyone: the
next process simply takes it over. The lock file also holds the holder's pid, so
whoever is refused (or made to wait) can say who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from nanogpt_core.errors import NanoGPTError
from nanogpt_core.files import storage_errors


class LockHeld(NanoGPTError):
    """Another live process holds the lock."""


def holder_pid(path: Path) -> int | None:
    """The pid written in a lock file, or None when it is empty or unreadable."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


@contextlib.contextmanager
def locked(
    path: Path,
    *,
    wait: bool,
    purpose: str,
    on_wait: Callable[[int | None], None] | None = None,
) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) inside the ``with`` block.

    :param wait: block until the holder lets go; otherwise raise :class:`LockHeld`.
    :param purpose: what the lock protects, for the refusal message
        (``"results/shakespeare_char"``).
    :param on_wait: called once with the holder's pid (or None) before blocking.
    """
    path = Path(path)
    with storage_errors(path):  # a full disk is the same one line as everywhere else
        path.parent.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: opening must not wipe the pid a live holder wrote.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            pid = holder_pid(path)
            if not wait:
                who = f"pid {pid}" if pid else "another process"
                raise LockHeld(
                    f"{purpose} is in use by {who} (lock {path}); wait for it to finish or stop it"
                )
            if on_wait is not None:
                on_wait(pid)
            fcntl.flock(fd, fcntl.LOCK_EX)
        with storage_errors(path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            # Clear the pid before letting go, so nobody names a finished process.
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
