"""Writing files so that nothing is ever half-written.

Every file that matters (checkpoints, prepared tokens, metrics, configs) is
written under a temporary name in its final folder, flushed to disk and renamed
into place: a kill at any moment leaves either the old file or the new one. A
full disk or a read-only folder becomes one :class:`StorageError` line naming the
path, and the previous file stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from nanogpt_core.errors import StorageError

TEMP_MARK = ".tmp-"
_TEMP_NAME = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(\d+)$")

# errno values that mean "this storage cannot take the write", not a bug.
_STORAGE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than this system allows (file-size limit)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied (read-only folder?)",
    errno.EPERM: "permission denied (read-only folder?)",
}


def temporary_path(final: Path) -> Path:
    """A temporary name beside ``final``, unique to this process."""
    return final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}")


def storage_error(path: Path, exc: OSError) -> StorageError | None:
    """A one-line :class:`StorageError` for a full or read-only disk, else None."""
    reason = _STORAGE_ERRORS.get(exc.errno or 0)
    if reason is None:
        return None
    return StorageError(f"{path}: cannot write: {reason}; free space or choose another folder")


@contextlib.contextmanager
def storage_errors(path: Path) -> Iterator[None]:
    """Turn a full-disk or read-only ``OSError`` inside the block into a :class:`StorageError`."""
    try:
        yield
    except OSError as exc:
        error = storage_error(path, exc)
        if error is None:
            raise
        raise error from exc


class _WriteRecorder:
    """A file wrapper that remembers the ``OSError`` a write raised.

    ``torch.save`` turns a failed write into a ``RuntimeError("unexpected pos
    ...")``; the recorded error lets us still say "the disk is full".
    """

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        """Write, remembering an ``OSError`` before it propagates."""
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> object:
        return getattr(self.handle, name)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(final: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(handle)`` on a temporary file, then rename it to ``final``.

    :raises StorageError: the disk is full or the folder read-only; ``final`` is
        left as it was and the temporary file is removed.
    """
    final = Path(final)
    temp = temporary_path(final)
    with storage_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            with temp.open("wb") as handle:
                recorder = _WriteRecorder(handle)
                try:
                    write(recorder)  # type: ignore[arg-type]
                except Exception:
                    if recorder.error is not None:
                        raise recorder.error from None
                    raise
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, final)
        finally:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
    fsync_dir(final.parent)


def atomic_write_text(final: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically."""
    atomic_write(final, lambda handle: handle.write(text.encode("utf-8")))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to someone else
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporaries that dead writers left in ``folder``; returns what was removed.

    A temporary's name ends with its writer's pid; one whose writer is still
    alive (another process writing into the same folder) is left alone.
    """
    removed: list[Path] = []
    if not Path(folder).is_dir():
        return removed
    for path in Path(folder).iterdir():
        match = _TEMP_NAME.match(path.name)
        if not match or pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
            removed.append(path)
    return removed


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent (where it would be created)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    """Free bytes for an unprivileged writer on ``path``'s file system."""
    try:
        return shutil.disk_usage(existing_ancestor(path)).free
    except OSError:
        return None
