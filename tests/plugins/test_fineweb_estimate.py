"""The fineweb dataset's token estimate: published counts offline, footers and token_count locally.

The row-group corpus of test_fineweb_row_groups.py (its ``token_count`` is a
word count, which the plugin trusts as it trusts FineWeb-Edu's GPT-2 counts)
checks the walk through sampling, held-out tokens and ``max_tokens``; the
FineWeb-Edu-schema sample in shared/data checks the estimate against a real
preparation.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import test_fineweb_row_groups as row_group_tests
from test_fineweb_row_groups import NOWHERE, local, rows_by_text, scan, split_docs

from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.data.preparation import prepare_dataset
from nanogpt_core.data.token_estimates import experiment_token_estimate
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_plugins.datasets import fineweb
from nanogpt_plugins.datasets.fineweb import FineWebOptions, FineWebSource

corpus = row_group_tests.corpus
counted = row_group_tests.counted


def estimate(options: FineWebOptions, tokenizer: str = "gpt2") -> dict[str, int] | None:
    return FineWebSource(options).token_estimate(tokenizer)


def counted_split(documents: list[tuple[str, str]], rows: dict[str, dict]) -> dict[str, int]:
    """``token_count + 1`` of the documents preparation keeps, per split."""
    counts = {"train": 0, "val": 0}
    for split, text in documents:
        counts[split] += rows[text]["token_count"] + 1
    return counts


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"fraction": 0.1},
        {"fraction": 0.25, "val_tokens": 3000},
        {"fraction": 0.5, "max_tokens": 20_000},
        {"max_tokens": 5_000, "val_tokens": 1},
    ],
)
def test_local_parquet_is_walked_as_preparation_walks_it(corpus, tmp_path, changes):
    """Exact: the same row groups, held-out documents and cap, counted from token_count."""
    options = local(corpus, **changes)
    assert estimate(options) == counted_split(split_docs(options, tmp_path), rows_by_text(corpus))


def test_the_estimate_reads_the_footers_and_the_token_count_column_only(corpus, counted, tmp_path):
    footers = scan(corpus)[1]
    split_docs(local(corpus, fraction=0.5), tmp_path)
    preparing = counted[-1].fetched - footers
    estimate(local(corpus, fraction=0.5))
    assert counted[-1].fetched - footers < 0.05 * preparing
    estimate(local(corpus, fraction=0.5, max_tokens=5_000))  # stops reading, as preparing does
    assert counted[-1].fetched - footers < 0.2 * (counted[-2].fetched - footers)


def test_min_int_score_makes_it_an_upper_bound(corpus, tmp_path):
    options = local(corpus, fraction=0.25, min_int_score=4)
    kept = counted_split(split_docs(options, tmp_path), rows_by_text(corpus))
    guess = estimate(options)
    assert guess == estimate(local(corpus, fraction=0.25))  # the filter is not applied
    assert guess["train"] > kept["train"]


def prepare_and_estimate(write_toml, tmp_path, data: str, extra: str = ""):
    plugins = load_plugins(disabled=())
    path = write_toml(
        "fineweb.toml",
        f'[dataset]\nplugin = "fineweb"\nsource = "local"\ntrain_files = ["{data}"]\n'
        f"val_tokens = 5000\n{extra}",
    )
    config = load_experiment(path, (), plugins)
    guess = experiment_token_estimate(config, plugins)
    assert not (tmp_path / "data").exists()  # nothing was prepared for it
    splits = prepare_dataset(config, plugins, data_dir=tmp_path / "data").meta["splits"]
    return guess, {split: splits[split]["tokens"] for split in ("train", "val")}


def test_the_schema_sample_estimate_equals_the_prepared_tokens(shared_data, write_toml, tmp_path):
    """token_count is GPT-2's count of each page's text: exact, split and all."""
    parquet = shared_data / "fineweb-edu" / "sample_edu.parquet"
    guess, prepared = prepare_and_estimate(write_toml, tmp_path, parquet)
    assert guess == prepared


def test_json_lines_are_estimated_from_their_size_within_15_percent(
    shared_data, write_toml, tmp_path
):
    """4.2 bytes a token; the rows' other fields (ids, urls) add bytes, its Python prose tokens."""
    jsonl = shared_data / "fineweb-edu" / "sample_edu.jsonl"
    guess, prepared = prepare_and_estimate(write_toml, tmp_path, jsonl)
    # val_tokens are held out first; preparation holds out whole documents, which
    # overshoot it by under one (FineWeb-Edu's pages average 1,000 tokens of 1M).
    largest = max(pq.read_table(jsonl.with_suffix(".parquet"))["token_count"].to_pylist()) + 1
    assert guess["val"] == 5000 <= prepared["val"] < 5000 + largest
    assert guess["train"] == pytest.approx(prepared["train"], rel=0.15)
    assert sum(guess.values()) == pytest.approx(sum(prepared.values()), rel=0.15)


@pytest.fixture
def no_hub(monkeypatch):
    """The hub cannot be reached, and any attempt to open its file system fails the test."""
    monkeypatch.setenv("HF_ENDPOINT", NOWHERE)
    opened = []

    def filesystem(source):
        opened.append(source)
        assert source == "local", "the estimate opened the hub"
        return row_group_tests.LocalFileSystem()

    monkeypatch.setattr(fineweb, "filesystem", filesystem)
    return opened


@pytest.mark.parametrize(
    ("subset", "fraction", "max_tokens", "expected_train"),
    [
        ("sample-10BT", 0.01, None, 100_000_000 - 1_000_000),
        ("sample-10BT", None, None, 10_000_000_000 - 1_000_000),
        ("sample-100BT", 0.001, None, 100_000_000 - 1_000_000),
        ("sample-350BT", 0.5, 2_000_000_000, 2_000_000_000),
        ("default", 0.01, None, 13_000_000_000 - 1_000_000),
    ],
)
def test_the_hub_is_its_published_count_times_the_fraction_offline(
    no_hub, subset, fraction, max_tokens, expected_train
):
    options = FineWebOptions(subset=subset, fraction=fraction, max_tokens=max_tokens)
    assert estimate(options) == {"train": expected_train, "val": 1_000_000}


def test_what_the_hub_does_not_publish_is_unknown(no_hub, shared_data):
    assert estimate(FineWebOptions(subset="CC-MAIN-2024-10")) is None
    assert estimate(FineWebOptions(fraction=0.01), "char") is None  # its counts are GPT-2's
    # Local validation files beside the hub's training sample are counted from their column.
    parquet = str(shared_data / "fineweb-edu" / "sample_edu.parquet")
    both = estimate(FineWebOptions(fraction=0.01, val_files=[parquet]))
    assert both == {"train": 100_000_000, "val": 100_271}
