"""The tinystories dataset on the real samples: every local format, held-out stories, the hub path."""

from __future__ import annotations

import json
import re

import pytest

from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.data.documents import read_texts
from nanogpt_core.data.preparation import prepare_dataset
from nanogpt_core.errors import DataError
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_plugins.datasets import tinystories
from nanogpt_plugins.datasets.tinystories import TinyStoriesOptions, TinyStoriesSource, held_out
from nanogpt_plugins.tokenizers.gpt2 import GPT2Tokenizer


def stories(source, split, tmp_path):
    return list(source.documents(split, tmp_path))


def test_reads_the_original_txt_format(shared_data):
    texts = list(read_texts(shared_data / "tinystories" / "tinystories_sample.txt"))
    assert len(texts) == 5
    assert texts[0].startswith("Once upon a time there was a little boy named Ben.")
    assert all("<|endoftext|>" not in t and t == t.strip() for t in texts)


def test_every_local_format_gives_the_same_stories(shared_data, tmp_path):
    folder = shared_data / "tinystories"
    from_json = list(read_texts(folder / "tiny-stories.json"))
    from_txt = list(read_texts(folder / "derived_tiny-stories_endoftext.txt"))
    rows = list(read_texts(folder / "derived_train.jsonl")) + list(
        read_texts(folder / "derived_validation.jsonl")
    )
    parquet = list(read_texts(folder / "derived_train.parquet")) + list(
        read_texts(folder / "derived_validation.parquet")
    )
    assert len(from_json) == 2398
    assert [t.strip() for t in from_json] == from_txt
    assert rows == parquet == from_json


def test_val_files_are_the_validation_split(shared_data, tmp_path):
    folder = shared_data / "tinystories"
    source = TinyStoriesSource(
        TinyStoriesOptions(
            source="local",
            train_files=[str(folder / "derived_train.parquet")],
            val_files=[str(folder / "derived_validation.jsonl")],
        )
    )
    assert len(stories(source, "train", tmp_path)) == 2158
    assert stories(source, "val", tmp_path) == list(read_texts(folder / "derived_validation.jsonl"))


def test_without_val_files_whole_stories_are_held_out(shared_data, tmp_path):
    path = str(shared_data / "tinystories" / "derived_tiny-stories_endoftext.txt")
    source = TinyStoriesSource(
        TinyStoriesOptions(source="local", train_files=[path], val_fraction=0.1)
    )
    train, val = stories(source, "train", tmp_path), stories(source, "val", tmp_path)
    everything = list(
        read_texts(shared_data / "tinystories" / "derived_tiny-stories_endoftext.txt")
    )
    assert sorted(train + val) == sorted(everything)
    assert train == [t for t in everything if not held_out(t, 1337, 0.1)]
    assert 150 < len(val) < 330


def test_prepared_tokens_decode_to_the_stories_in_order(shared_data, write_toml, tmp_path):
    path = shared_data / "tinystories" / "derived_train.jsonl"
    experiment = write_toml(
        "ts.toml",
        f'[dataset]\nplugin = "tinystories"\nsource = "local"\ntrain_files = ["{path}"]\nval_files = ["{shared_data / "tinystories" / "derived_validation.parquet"}"]\n',
    )
    plugins = load_plugins(disabled=())
    prepared = prepare_dataset(
        load_experiment(experiment, (), plugins), plugins, data_dir=tmp_path / "data"
    )
    ids = prepared.split_path("train").read_bytes()
    import numpy as np

    tokens = np.frombuffer(ids, dtype=np.uint16).tolist()
    decoded = GPT2Tokenizer().decode(tokens).split("<|endoftext|>")
    assert decoded[:-1] == list(read_texts(path)) and decoded[-1] == ""
    assert prepared.meta["splits"]["train"]["documents"] == 2158
    assert prepared.meta["splits"]["val"]["documents"] == 240


def test_text_field_renames_the_column(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"story": f"Story {i}."}) for i in range(40)) + "\n")
    source = TinyStoriesSource(
        TinyStoriesOptions(
            source="local", train_files=[str(rows)], text_field="story", val_fraction=0.5
        )
    )
    assert sorted(stories(source, "train", tmp_path) + stories(source, "val", tmp_path)) == sorted(
        f"Story {i}." for i in range(40)
    )


def test_local_source_needs_train_files(write_toml):
    from nanogpt_core.errors import ConfigError

    plugins = load_plugins(disabled=())
    with pytest.raises(
        ConfigError, match=re.escape('dataset.train_files: source = "local" needs train_files')
    ):
        load_experiment(
            write_toml("x.toml", '[dataset]\nplugin = "tinystories"\nsource = "local"\n'),
            (),
            plugins,
        )


def test_hub_source_streams_both_splits(shared_data, tmp_path, monkeypatch):
    calls = []

    def fake_hub(name, subset, split):
        calls.append((name, subset, split))
        file = "derived_train.jsonl" if split == "train" else "derived_validation.jsonl"
        yield from ({"text": t} for t in read_texts(shared_data / "tinystories" / file))

    monkeypatch.setattr(tinystories, "hub_rows", fake_hub)
    source = TinyStoriesSource(TinyStoriesOptions())
    assert source.variant == "hub-gpt2"
    pairs = list(source.split_documents(tmp_path))
    assert sum(1 for split, _ in pairs if split == "train") == 2158
    assert sum(1 for split, _ in pairs if split == "val") == 240
    assert calls == [
        ("roneneldan/TinyStories", None, "train"),
        ("roneneldan/TinyStories", None, "validation"),
    ]


def test_hub_failure_is_one_line(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'roneneldan/TinyStories' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError,
        match=r'could not read roneneldan/TinyStories from the Hugging Face hub .*use source = "local"',
    ):
        stories(TinyStoriesSource(TinyStoriesOptions()), "train", tmp_path)


def test_undecodable_bytes_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    source = TinyStoriesSource(TinyStoriesOptions(source="local", train_files=[str(bad)]))
    with pytest.raises(DataError, match=r"bad\.jsonl: not UTF-8 text"):
        list(source.split_documents(tmp_path))


@pytest.mark.parametrize(
    ("fraction", "message"),
    [
        (
            1e-9,
            "dataset.val_fraction: none of the 2,398 stories went to validation: "
            "val_fraction = 1e-09 is too small to hold any; raise it, or give val_files",
        ),
        (
            0.999999999,
            "dataset.val_fraction: all 2,398 stories went to validation: "
            "val_fraction = 0.999999999; lower it, or give val_files",
        ),
    ],
)
def test_a_held_out_share_that_empties_a_split_says_why(shared_data, tmp_path, fraction, message):
    path = str(shared_data / "tinystories" / "derived_tiny-stories_endoftext.txt")
    source = TinyStoriesSource(
        TinyStoriesOptions(source="local", train_files=[path], val_fraction=fraction)
    )
    with pytest.raises(DataError) as info:
        stories(source, "train", tmp_path)
    assert str(info.value) == message
