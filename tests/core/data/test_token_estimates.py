"""Token estimates before preparation: the optional dataset method, its faults, the byte rule.

A third party's dataset is registered in-process next to the installed plugins
and chosen by a real experiment file, as ``gpt plan`` will choose it.
"""

from __future__ import annotations

import json

import attrs
import numpy as np
import pyarrow.parquet as pq
import pytest

from nanogpt_core import DataError, hookimpl, option, tokens_from_text_bytes
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.data.token_estimates import estimate_tokens, experiment_token_estimate
from nanogpt_core.data.tokenizers import gpt2_encoding
from nanogpt_core.errors import PluginError, PluginFault
from nanogpt_core.plugins.registry import load_plugins

# What the third party's token_estimate returns (or raises), by its `answer` option.
ANSWERS = {
    "good": {"train": 900, "val": np.int64(100)},
    "examples": {"train": 900, "val": 100, "train_examples": 9, "val_examples": 1},
    "unknown": None,
    "a list": [900, 100],
    "negative": {"train": -1, "val": 100},
    "a float": {"train": 900.0, "val": 100},
    "a bool": {"train": True, "val": 100},
    "no val": {"train": 900},
    "a typo": {"train": 900, "validation": 100},
}


@attrs.frozen(kw_only=True)
class GuessOptions:
    """Options of the in-process ``guess`` dataset."""

    answer: str = option("good", "What token_estimate does.")


class GuessSource:
    """A third party's source with a token_estimate that does as it is told."""

    variant = "v"
    tokenizer = "char"
    description = "guesses"

    def __init__(self, options: GuessOptions) -> None:
        self.answer = options.answer
        self.asked: list[str] = []

    def documents(self, split, downloads):
        yield "some text"

    def token_estimate(self, tokenizer):
        self.asked.append(tokenizer)
        if self.answer == "raises":
            return {"train": 1 // 0}
        if self.answer == "data error":
            raise DataError("corpus.txt: file not found")
        return ANSWERS[self.answer]


class OldSource:
    """A source written before token estimates: no such method."""

    variant = "v"
    tokenizer = "char"
    description = "old"

    def __init__(self, options) -> None:
        pass

    def documents(self, split, downloads):
        yield "some text"


@attrs.frozen(kw_only=True)
class NoOptions:
    """No options."""


class ThirdParty:
    @hookimpl
    def register_datasets(self, register):
        register("guess", GuessSource, options=GuessOptions)
        register("old", OldSource, options=NoOptions)


@pytest.fixture
def plugins():
    loaded = load_plugins(disabled=())
    assert loaded.register(ThirdParty(), name="third_party")
    return loaded


def estimate(plugins, write_toml, body):
    config = load_experiment(write_toml("exp.toml", body), (), plugins)
    return experiment_token_estimate(config, plugins)


def guess(answer: str) -> str:
    return f'[dataset]\nplugin = "guess"\nanswer = "{answer}"\n'


def test_an_estimate_comes_back_as_plain_ints(plugins, write_toml):
    result = estimate(plugins, write_toml, guess("good"))
    assert result == {"train": 900, "val": 100}
    assert all(type(v) is int for v in result.values())
    examples = estimate(plugins, write_toml, guess("examples"))
    assert examples == ANSWERS["examples"]


def test_a_source_without_the_method_or_without_an_answer_gives_none(plugins, write_toml):
    assert estimate(plugins, write_toml, '[dataset]\nplugin = "old"\n') is None
    assert estimate(plugins, write_toml, guess("unknown")) is None


def test_the_method_is_asked_with_the_tokenizer_preparation_would_use(plugins, write_toml):
    config = load_experiment(
        write_toml("exp.toml", guess("good") + '[tokenizer]\nplugin = "gpt2"\n'), (), plugins
    )
    source = GuessSource(GuessOptions())
    assert estimate_tokens(source, "gpt2") == {"train": 900, "val": 100}
    assert source.asked == ["gpt2"]
    # Through the experiment: the [tokenizer] table's choice, not the source's "char".
    asked = []
    original = GuessSource.token_estimate

    def recording(self, tokenizer):
        asked.append(tokenizer)
        return original(self, tokenizer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GuessSource, "token_estimate", recording)
        experiment_token_estimate(config, plugins)
        estimate(plugins, write_toml, guess("good"))
    assert asked == ["gpt2", "char"]


def test_a_method_that_raises_is_one_plugin_fault_line(plugins, write_toml):
    with pytest.raises(PluginFault) as fault:
        estimate(plugins, write_toml, guess("raises"))
    assert str(fault.value) == (
        "dataset 'guess' (plugin 'third_party') failed in token_estimate: "
        "ZeroDivisionError: integer division or modulo by zero"
    )
    assert isinstance(fault.value.__cause__, ZeroDivisionError)  # --debug shows it
    # Bad input the plugin words itself passes unchanged.
    with pytest.raises(DataError, match=r"^corpus\.txt: file not found$"):
        estimate(plugins, write_toml, guess("data error"))


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ("a list", "returned a list"),
        ("negative", "returned train = -1"),
        ("a float", "returned train = 900.0"),
        ("a bool", "returned train = True"),
        ("no val", "returned no 'val'"),
        ("a typo", "returned unknown key 'validation'"),
    ],
)
def test_an_answer_that_is_not_counts_is_one_plugin_error_line(
    plugins, write_toml, answer, problem
):
    with pytest.raises(PluginError) as refused:
        estimate(plugins, write_toml, guess(answer))
    message = str(refused.value)
    assert message.startswith(f"dataset 'guess' (plugin 'third_party'): token_estimate {problem}")
    assert "'train': n, 'val': m" in message and "\n" not in message


def test_a_source_outside_an_experiment_is_named_by_its_class():
    source = GuessSource(GuessOptions(answer="raises"))
    with pytest.raises(PluginFault, match=r"^dataset source GuessSource failed in token_estimate"):
        estimate_tokens(source, "char")


def test_tokens_from_text_bytes_knows_the_builtin_tokenizers_only():
    assert tokens_from_text_bytes(1_115_394, "char") == 1_115_394
    assert tokens_from_text_bytes(4_200, "gpt2") == 1_000
    assert tokens_from_text_bytes(0, "gpt2") == 0
    assert tokens_from_text_bytes(1_000, "huggingface") is None


def test_the_gpt2_figure_is_within_5_percent_on_english_prose(shared_data):
    """The 4.2 bytes a token of the rule, against tiktoken on real stories and web pages."""
    encoding = gpt2_encoding()
    stories = [r["text"] for r in pq.read_table(shared_data / "tinystories" / "derived_validation.parquet").to_pylist()]  # fmt: skip
    lines = (shared_data / "fineweb-edu" / "test_labels.jsonl").read_text().splitlines()
    pages = [json.loads(line)["text"] for line in lines]
    for texts in (stories, pages):
        size = sum(len(t.encode()) for t in texts)
        tokens = sum(len(encoding.encode_ordinary(t)) for t in texts)
        assert tokens_from_text_bytes(size, "gpt2") == pytest.approx(tokens, rel=0.05)
