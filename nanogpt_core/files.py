"""Writing files so that nothing is ever half-written.

Every file that matters (checkpoints, prepared tokens, metrics, configs) is
written under a temporary name in its final folder, flushed to disk and renamed
into place: a kill at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_MARK = ".tmp-"


def temporary_path(final: Path) -> Path:
    """A temporary name beside ``final``, unique to this process."""
    return final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}")


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
    """Call ``write(handle)`` on a temporary file, then rename it to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_path(final)
    try:
        with temp.open("wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(final.parent)


def atomic_write_text(final: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically."""
    atomic_write(final, lambda handle: handle.write(text.encode("utf-8")))


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporaries an interrupted writer left in ``folder``."""
    for path in folder.glob(f".*{TEMP_MARK}*"):
        path.unlink(missing_ok=True)
