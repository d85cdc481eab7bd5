"""The fingerprint of a preparation: a hash of everything that decides the prepared tokens.

``meta.json`` records it; a folder whose fingerprint differs from the
experiment's is prepared again. It covers the dataset's and the tokenizer's
options and the identity (path, size, modification time, and for small files a
hash) of every input file their path options name, so an edited input file is
seen even when the options are unchanged.
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanogpt_core.data.prepared import FORMAT_VERSION
from nanogpt_core.plugins.options import path_fields, unstructure

if TYPE_CHECKING:
    from nanogpt_core.data.plugins import TokenizerChoice

# Input files smaller than this are also hashed, so an edit that keeps the size
# and the modification time (a copy with `cp -p`, a coarse clock) is still seen.
HASHED_FILE_BYTES = 1 << 20


def file_identity(path: Path) -> dict[str, Any]:
    """A file's resolved path, size and modification time, and a sha256 when it is small."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    identity: dict[str, Any] = {
        "path": str(resolved),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    if resolved.is_file() and stat.st_size < HASHED_FILE_BYTES:
        identity["sha256"] = hashlib.sha256(resolved.read_bytes()).hexdigest()
    return identity


def input_files(options: Any) -> list[dict[str, Any]]:
    """The identity of every file the path options of ``options`` name (globs expanded).

    Options declared with ``option(..., path=True)`` hold a path or a list of
    paths and globs; a pattern that matches nothing is recorded as missing (the
    source itself reports it when it reads).
    """
    found: list[dict[str, Any]] = []
    for name in path_fields(type(options)):
        value = getattr(options, name)
        patterns = [value] if isinstance(value, str) else list(value or [])
        for pattern in patterns:
            matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
            if not matches:
                found.append({"option": name, "pattern": pattern, "missing": True})
            for match in matches:
                try:
                    found.append({"option": name, **file_identity(Path(match))})
                except OSError as exc:
                    found.append({"option": name, "pattern": match, "error": exc.strerror})
    return found


def fingerprint(
    plugin: str,
    options: Any,
    tokenizer: TokenizerChoice | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """A hash of everything that decides the prepared tokens.

    The dataset's options, the tokenizer's name and options, the identity of
    every input file named by a path option of either (:func:`input_files`),
    and ``extra`` (for examples: the template and the block size).
    """
    payload: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "plugin": plugin,
        "options": unstructure(options),
        "inputs": input_files(options),
    }
    if tokenizer is not None:
        payload["tokenizer"] = {
            "name": tokenizer.name,
            "options": unstructure(tokenizer.options),
            "inputs": input_files(tokenizer.options),
        }
    if extra:
        payload.update(extra)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
