"""The ``huggingface`` tokenizer: any local Hugging Face ``tokenizer.json``.

For corpora GPT-2's English-centred BPE serves badly (Korean, say): train a
tokenizer with the ``tokenizers`` library, save its ``tokenizer.json`` and name it
in the experiment's ``[tokenizer]`` table. The whole file travels in ``meta.json``
and in every checkpoint, so ``gpt sample`` and ``gpt export`` work without it;
export writes it back with a ``tokenizer_config.json`` for
``PreTrainedTokenizerFast``, so ``AutoTokenizer.from_pretrained`` gives the same ids.
Needs the ``tokenizers`` package (``pip install 'nanogpt[tokenizers]'``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from nanogpt_core import DataError, NanoGPTError, Tokenizer, hookimpl, option

# Tried in this order when eos_token is not set: the usual end-of-text tokens.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


@attrs.frozen(kw_only=True)
class HuggingFaceOptions:
    """Options of the ``huggingface`` tokenizer."""

    path: str = option(
        doc="A local Hugging Face tokenizer.json (relative to the experiment file).", path=True
    )
    eos_token: str | None = option(
        None,
        "The token that ends each document. Default: the first of <|endoftext|>, </s>, <eos>, "
        '<|end_of_text|> the tokenizer has; "" for none (documents run together).',
    )


def _library() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise NanoGPTError(
            "the huggingface tokenizer needs the 'tokenizers' package: "
            "pip install 'nanogpt[tokenizers]'"
        ) from None
    return tokenizers


def _parse(text: str, where: str) -> Any:
    try:
        return _library().Tokenizer.from_str(text)
    except NanoGPTError:
        raise
    except Exception as exc:  # the Rust library raises a bare Exception for bad files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{where}: not a Hugging Face tokenizer.json ({first})") from None


def _eos(backend: Any, wanted: str | None, where: str) -> tuple[str | None, int | None]:
    """The end-of-document token and its id, as asked for or found among the usual ones."""
    if wanted == "":
        return None, None
    if wanted is not None:
        token_id = backend.token_to_id(wanted)
        if token_id is None:
            raise DataError(f"tokenizer.eos_token: {wanted!r} is not in {where}'s vocabulary")
        return wanted, token_id
    for candidate in EOS_CANDIDATES:
        token_id = backend.token_to_id(candidate)
        if token_id is not None:
            return candidate, token_id
    return None, None


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer, carried whole in its description."""

    def __init__(self, options: HuggingFaceOptions) -> None:
        path = Path(options.path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"tokenizer.path: {path}: file not found") from None
        except IsADirectoryError:
            raise DataError(
                f"tokenizer.path: {path}: is a folder; name its tokenizer.json"
            ) from None
        except UnicodeDecodeError as exc:
            raise DataError(f"tokenizer.path: {path}: not UTF-8 text ({exc.reason})") from None
        backend = _parse(text, f"tokenizer.path: {path}")
        eos_token, eot_id = _eos(backend, options.eos_token, str(path))
        self._setup(text, backend, eos_token, eot_id)

    def _setup(self, text: str, backend: Any, eos_token: str | None, eot_id: int | None) -> None:
        self._text = text
        self._backend = backend
        self.eos_token = eos_token
        self.eot_id = eot_id
        # Ids need not be contiguous: size the embedding by the largest one.
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the Hugging Face tokenizer gives them (no BOS/EOS added)."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """Ids of ``texts``, each followed by the eos token; the library encodes them in parallel."""
        end = [] if self.eot_id is None else [self.eot_id]
        ids: list[int] = []
        for encoding in self._backend.encode_batch(texts, add_special_tokens=False):
            ids.extend(encoding.ids)
            ids.extend(end)
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens included, as generated)."""
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def description(self) -> dict[str, Any]:
        """``{"kind": "huggingface", ...}`` with the whole tokenizer.json text."""
        return {
            "kind": "huggingface",
            "name": "huggingface",
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "eos_token": self.eos_token,
            "sha256": hashlib.sha256(self._text.encode("utf-8")).hexdigest(),
            "tokenizer_json": self._text,
        }

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> HuggingFaceTokenizer:
        """The tokenizer whose tokenizer.json text the description carries."""
        text = description.get("tokenizer_json")
        if not isinstance(text, str) or (
            hashlib.sha256(text.encode("utf-8")).hexdigest() != description.get("sha256")
        ):
            raise NanoGPTError(
                "huggingface tokenizer description: its tokenizer.json text is missing or damaged"
            )
        backend = _parse(text, "the stored tokenizer.json")
        eos_token = description.get("eos_token")
        eot_id = None if eos_token is None else backend.token_to_id(eos_token)
        tokenizer = cls.__new__(cls)
        tokenizer._setup(text, backend, eos_token, eot_id)
        return tokenizer

    def export_hf(self, folder: Path, *, model_max_length: int) -> None:
        """``tokenizer.json`` and a ``tokenizer_config.json`` for ``PreTrainedTokenizerFast``."""
        (folder / "tokenizer.json").write_text(self._text, encoding="utf-8")
        special = {"eos_token": self.eos_token, "bos_token": self.eos_token}
        special = {k: v for k, v in special.items() if v is not None}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            **special,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if special:
            (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


@hookimpl
def register_tokenizers(register):
    """Register the ``huggingface`` tokenizer."""
    register(
        "huggingface",
        HuggingFaceTokenizer,
        options=HuggingFaceOptions,
        description="A local Hugging Face tokenizer.json (any language), carried into checkpoints.",
    )
