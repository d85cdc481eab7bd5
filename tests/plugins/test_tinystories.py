"""The tinystories dataset on the real samples: every local format, held-out stories, the hub path."""

from __future__ import annotations

import json
import re
from pathlib import Path

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


@pytest.fixture
def stories_hub(local_hub, shared_data):
    """roneneldan/TinyStories served from the parquet samples, in the hub's row format."""
    folder = shared_data / "tinystories"
    local_hub.serve(tinystories.HUB_NAME, "train", folder / "derived_train.parquet")
    local_hub.serve(tinystories.HUB_NAME, "validation", folder / "derived_validation.parquet")
    return local_hub


def test_caps_stop_reading_the_hub_after_the_first_stories(stories_hub, shared_data, tmp_path):
    folder = shared_data / "tinystories"
    source = TinyStoriesSource(TinyStoriesOptions(max_documents=300, max_val_documents=20))
    pairs = list(source.split_documents(tmp_path))
    train = [text.strip() for text in read_texts(folder / "derived_train.parquet")]
    val = [text.strip() for text in read_texts(folder / "derived_validation.parquet")]
    assert [text for split, text in pairs if split == "train"] == train[:300]
    assert [text for split, text in pairs if split == "val"] == val[:20]
    # Streamed, and no row asked for past a cap: each stream was closed there.
    assert stories_hub.calls == [
        (tinystories.HUB_NAME, None, "train", True),
        (tinystories.HUB_NAME, None, "validation", True),
    ]
    assert stories_hub.served == {"train": 300, "validation": 20}
    assert stories_hub.closed == ["train", "validation"]
    assert source.variant == "hub-gpt2-first300-val20"
    assert source.description == (
        "TinyStories from the Hugging Face hub (roneneldan/TinyStories) "
        "(the first 300 training stories and the first 20 validation stories)"
    )


def test_capped_and_whole_preparations_never_share_a_folder(stories_hub, tmp_path):
    # The CPU demo as shipped, the same capped harder, and the full hub run.
    plugins = load_plugins(disabled=())
    experiments = Path(__file__).resolve().parents[2] / "experiments"
    runs = {
        "hub-gpt2-first10000-val500": (experiments / "cpu" / "tinystories_cpu.toml", ()),
        "hub-gpt2-first100-val10": (
            experiments / "cpu" / "tinystories_cpu.toml",
            ("dataset.max_documents=100", "dataset.max_val_documents=10"),
        ),
        "hub-gpt2": (experiments / "tinystories.toml", ()),
    }
    metas = {}
    for variant, (path, overrides) in runs.items():
        config = load_experiment(path, overrides, plugins)
        prepared = prepare_dataset(config, plugins, data_dir=tmp_path / "data")
        assert prepared.folder == tmp_path / "data" / "tinystories" / variant
        metas[variant] = prepared.meta
    # The samples hold 2,158 + 240 stories: under the shipped caps, all of them.
    documents = {
        v: [m["splits"][s]["documents"] for s in ("train", "val")] for v, m in metas.items()
    }
    assert documents == {
        "hub-gpt2-first10000-val500": [2158, 240],
        "hub-gpt2-first100-val10": [100, 10],
        "hub-gpt2": [2158, 240],
    }
    assert len({m["fingerprint"] for m in metas.values()}) == 3
    # Preparing the others left each folder as it was.
    for variant, meta in metas.items():
        on_disk = json.loads(
            (tmp_path / "data" / "tinystories" / variant / "meta.json").read_text()
        )
        assert on_disk["fingerprint"] == meta["fingerprint"]


def test_caps_on_held_out_stories_stop_at_the_training_cap(shared_data, tmp_path):
    path = shared_data / "tinystories" / "derived_tiny-stories_endoftext.txt"
    source = TinyStoriesSource(
        TinyStoriesOptions(
            source="local",
            train_files=[str(path)],
            val_fraction=0.1,
            max_documents=50,
            max_val_documents=3,
        )
    )
    pairs = list(source.split_documents(tmp_path))
    everything = list(read_texts(path))
    train = [t for t in everything if not held_out(t, 1337, 0.1)][:50]
    # Held-out stories met before the 50th training story, the first 3 of them.
    read = everything[: everything.index(train[-1]) + 1]
    val = [t for t in read if held_out(t, 1337, 0.1)][:3]
    assert [t for s, t in pairs if s == "train"] == train
    assert [t for s, t in pairs if s == "val"] == val and len(val) == 3
    assert source.variant == "local-gpt2-first50-val3"


def test_a_cap_must_be_positive(write_toml):
    from nanogpt_core.errors import ConfigError

    path = write_toml("x.toml", '[dataset]\nplugin = "tinystories"\nmax_documents = 0\n')
    with pytest.raises(ConfigError, match=r"dataset\.max_documents: must be greater than 0, got 0"):
        load_experiment(path, (), load_plugins(disabled=()))
