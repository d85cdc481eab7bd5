"""The fineweb dataset on FineWeb-Edu-schema samples: filters, sampling, held-out documents.

Row-group sampling of parquet, and the hub, are in test_fineweb_row_groups.py.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from nanogpt_core.data.documents import read_rows
from nanogpt_core.errors import DataError
from nanogpt_plugins.datasets.fineweb import FineWebOptions, FineWebSource

COLUMNS = [
    "text",
    "id",
    "dump",
    "url",
    "file_path",
    "language",
    "language_score",
    "token_count",
    "score",
    "int_score",
]


@pytest.fixture
def parquet(shared_data):
    return str(shared_data / "fineweb-edu" / "sample_edu.parquet")


def docs(options, split, tmp_path):
    return list(FineWebSource(options).documents(split, tmp_path))


def all_rows(path):
    return pq.read_table(path).to_pylist()


def test_sample_has_fineweb_edu_columns(parquet):
    assert pq.read_schema(parquet).names == COLUMNS


def test_parquet_and_jsonl_give_the_same_documents(parquet, shared_data, tmp_path):
    jsonl = str(shared_data / "fineweb-edu" / "sample_edu.jsonl")
    a = FineWebOptions(source="local", train_files=[parquet], val_tokens=3000)
    b = FineWebOptions(source="local", train_files=[jsonl], val_tokens=3000)
    for split in ("train", "val"):
        assert docs(a, split, tmp_path) == docs(b, split, tmp_path)


def test_val_is_the_first_whole_documents_up_to_val_tokens(parquet, tmp_path):
    rows = all_rows(parquet)
    options = FineWebOptions(source="local", train_files=[parquet], val_tokens=5000)
    val, train = docs(options, "val", tmp_path), docs(options, "train", tmp_path)
    counted, expected_val = 0, []
    for row in rows:
        if counted >= 5000:
            break
        expected_val.append(row["text"])
        counted += row["token_count"] + 1
    assert val == expected_val
    assert val + train == [r["text"] for r in rows]


def test_min_int_score_filters(parquet, tmp_path):
    options = FineWebOptions(source="local", train_files=[parquet], val_tokens=1, min_int_score=4)
    kept = docs(options, "val", tmp_path) + docs(options, "train", tmp_path)
    assert kept == [
        r["text"] for r in all_rows(parquet) if r["int_score"] is not None and r["int_score"] >= 4
    ]
    assert 0 < len(kept) < 50


def test_fraction_of_jsonl_is_a_seeded_sample_of_documents_independent_of_order(
    shared_data, tmp_path
):
    # JSON Lines has no row groups: documents are kept by a seeded hash of their id.
    jsonl = shared_data / "fineweb-edu" / "sample_edu.jsonl"
    reversed_file = tmp_path / "reversed.jsonl"
    reversed_file.write_text("".join(reversed(jsonl.read_text().splitlines(keepends=True))))

    def sample(path, seed=1337):
        options = FineWebOptions(
            source="local", train_files=[str(path)], val_tokens=1, fraction=0.5, seed=seed
        )
        return set(docs(options, "val", tmp_path) + docs(options, "train", tmp_path))

    first = sample(jsonl)
    assert first == sample(jsonl) == sample(reversed_file)
    assert 10 < len(first) < 40
    assert sample(jsonl, seed=7) != first


def test_fraction_of_parquet_keeps_whole_row_groups(parquet, tmp_path):
    # The sample's 50 rows rewritten as 10 row groups of 5: a 0.5 sample is 5 whole groups.
    rows = all_rows(parquet)
    grouped = tmp_path / "grouped.parquet"
    pq.write_table(pq.read_table(parquet), grouped, row_group_size=5)
    options = FineWebOptions(source="local", train_files=[str(grouped)], val_tokens=1, fraction=0.5)
    kept = docs(options, "val", tmp_path) + docs(options, "train", tmp_path)
    position = {r["text"]: i for i, r in enumerate(rows)}
    groups = {position[text] // 5 for text in kept}
    assert len(kept) == 25 and len(groups) == 5
    assert sorted(position[text] for text in kept) == sorted(
        i for g in groups for i in range(5 * g, 5 * g + 5)
    )


def test_max_tokens_caps_the_training_documents(parquet, tmp_path):
    options = FineWebOptions(
        source="local", train_files=[parquet], val_tokens=1000, max_tokens=10_000
    )
    train = docs(options, "train", tmp_path)
    rows = {r["text"]: r["token_count"] + 1 for r in all_rows(parquet)}
    assert sum(rows[t] for t in train) <= 10_000
    assert len(train) >= 2


def test_rows_without_the_filter_column_are_refused(shared_data, tmp_path):
    labels = str(shared_data / "fineweb-edu" / "test_labels.jsonl")
    with pytest.raises(DataError, match=r"line 1 has no 'int_score' field \(it has: id, label"):
        docs(FineWebOptions(source="local", train_files=[labels], min_int_score=3), "val", tmp_path)
    # Without int_score filtering, id and text are all it needs.
    assert len(list(read_rows(shared_data / "fineweb-edu" / "test_labels.jsonl", ["text"]))) == 3


def test_a_val_share_that_takes_every_document_says_why(parquet, tmp_path):
    options = FineWebOptions(source="local", train_files=[parquet], val_tokens=10**9)
    with pytest.raises(DataError) as info:
        docs(options, "train", tmp_path)
    assert str(info.value) == (
        "dataset.val_tokens: all 50 documents went to validation: val_tokens = 1,000,000,000; "
        "lower it (or give val_files)"
    )


def test_filters_that_keep_nothing_say_which(parquet, shared_data, tmp_path):
    # (A parquet sample keeps at least one row group; a jsonl one may keep no document.)
    jsonl = str(shared_data / "fineweb-edu" / "sample_edu.jsonl")
    options = FineWebOptions(source="local", train_files=[jsonl], fraction=1e-9)
    with pytest.raises(
        DataError, match=r"train_files: no document with text was kept with fraction = 1e-09$"
    ):
        docs(options, "train", tmp_path)
    options = FineWebOptions(source="local", train_files=[parquet], val_tokens=1, max_tokens=1)
    with pytest.raises(
        DataError, match=r"dataset\.max_tokens: 1 is less than the first training document"
    ):
        docs(options, "train", tmp_path)
