"""The alpaca dataset on the real samples: every local format, the hash split, bad records, the hub."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.data.preparation import prepare_dataset
from nanogpt_core.data.prepared import open_prepared
from nanogpt_core.errors import DataError
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_plugins.datasets import alpaca
from nanogpt_plugins.datasets.alpaca import AlpacaOptions, AlpacaSource, held_out
from nanogpt_plugins.templates.alpaca import AlpacaTemplate
from nanogpt_plugins.tokenizers.gpt2 import GPT2Tokenizer

# Records of alpaca_sample.json (from 1) whose output is empty, as in the original data.
EMPTY_OUTPUTS = (285, 1224, 1348, 1737)


def records(path):
    """The records of a sample file, as plain dicts."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def non_empty(rows):
    return [r for r in rows if r["output"].strip()]


def gpt(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def experiment(tmp_path, train, val=(), block_size=1024, extra=""):
    """An alpaca experiment file over local files."""
    path = tmp_path / "alpaca.toml"
    path.write_text(
        "[dataset]\n"
        'plugin = "alpaca"\n'
        'source = "local"\n'
        f"train_files = {json.dumps([str(p) for p in train])}\n"
        f"val_files = {json.dumps([str(p) for p in val])}\n"
        f"{extra}"
        f"[model]\nblock_size = {block_size}\n"
    )
    return path


def prepare(path, tmp_path, plugins=None):
    plugins = plugins or load_plugins(disabled=())
    config = load_experiment(path, (), plugins)
    return prepare_dataset(config, plugins, data_dir=tmp_path / "data")


def decoded_examples(prepared, split):
    """Each example as (prompt text, response text) from the prepared files."""
    tokens = np.memmap(prepared.split_path(split), dtype=prepared.dtype, mode="r")
    decode = GPT2Tokenizer().decode
    return [
        (decode(tokens[s : s + r].tolist()), decode(tokens[s + r : s + n].tolist()))
        for s, n, r in prepared.examples(split).tolist()
    ]


def expected(rows):
    template = AlpacaTemplate()
    return [
        (template.prompt(r["instruction"], r["input"]), r["output"] + "<|endoftext|>") for r in rows
    ]


def test_gpt_prepare_writes_examples_that_decode_to_prompt_output_and_eot(shared_data, tmp_path):
    sample = shared_data / "alpaca"
    path = experiment(
        tmp_path,
        [sample / "alpaca_sample.json"],
        [sample / "alpaca_sample.jsonl"],
        extra="skip_empty_output = true\n",
    )
    result = gpt("prepare", str(path), "--data-dir", "data", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "alpaca: left out 4 records with an empty output" in result.stderr
    assert "truncated" not in result.stderr  # block_size 1024 fits every example
    prepared = open_prepared(tmp_path / "data" / "alpaca" / "local-gpt2")
    train = non_empty(records(sample / "alpaca_sample.json"))
    val = records(sample / "alpaca_sample.jsonl")
    assert decoded_examples(prepared, "train") == expected(train)
    assert decoded_examples(prepared, "val") == expected(val)
    rows = prepared.examples("train")
    assert rows.dtype == np.int64 and rows.shape == (1996, 3)
    assert (rows[1:, 0] == rows[:-1, 0] + rows[:-1, 1]).all()  # contiguous, in order
    meta = json.loads((prepared.folder / "meta.json").read_text())
    assert meta["kind"] == "examples" == prepared.kind
    assert meta["template"] == {"kind": "alpaca"} == prepared.template
    assert meta["block_size"] == 1024
    counts = meta["splits"]["val"]
    assert counts["examples"] == counts["documents"] == 500
    assert counts["truncated"] == counts["dropped"] == 0
    assert counts["tokens"] == int(prepared.examples("val")[:, 1].sum())
    lengths = prepared.examples("val")[:, 1] - prepared.examples("val")[:, 2]
    assert counts["response_tokens"] == int(lengths.sum())


def test_parquet_and_jsonl_give_the_same_examples_as_json(shared_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = non_empty(records(shared_data / "alpaca" / "alpaca_sample.json"))[:300]
    as_json, as_jsonl, as_parquet = (tmp_path / f"r{s}" for s in (".json", ".jsonl", ".parquet"))
    as_json.write_text(json.dumps(rows, indent=4))
    as_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), as_parquet)
    val = shared_data / "alpaca" / "alpaca_sample.jsonl"
    folders = []
    for file in (as_json, as_jsonl, as_parquet):
        run = tmp_path / file.suffix[1:]
        run.mkdir()
        prepared = prepare(experiment(run, [file], [val]), run)
        folders.append(prepared)
    first = folders[0]
    assert decoded_examples(first, "train") == expected(rows)
    for other in folders[1:]:
        assert other.split_path("train").read_bytes() == first.split_path("train").read_bytes()
        assert np.array_equal(other.examples("train"), first.examples("train"))


def test_held_out_records_do_not_depend_on_file_order(shared_data, tmp_path):
    rows = non_empty(records(shared_data / "alpaca" / "alpaca_sample.json"))
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    files = []
    for name, content in (("a.json", rows), ("b.jsonl", shuffled)):
        files.append(tmp_path / name)
        lines = [json.dumps(r) for r in content]
        files[-1].write_text(json.dumps(content) if name.endswith(".json") else "\n".join(lines))
    splits = []
    for file in files:
        source = AlpacaSource(AlpacaOptions(source="local", train_files=[str(file)]))
        pairs = list(source.split_examples(tmp_path))
        splits.append(
            {s: sorted(json.dumps(r) for w, r in pairs if w == s) for s in ("train", "val")}
        )
    assert splits[0] == splits[1]
    assert 15 < len(splits[0]["val"]) < 70  # about 2% of 1,996
    assert all(held_out(json.loads(r), 1337, 0.02) for r in splits[0]["val"])


def test_an_empty_output_stops_prepare_at_its_record(shared_data, tmp_path):
    path = experiment(tmp_path, [shared_data / "alpaca" / "alpaca_sample.json"])
    result = gpt("prepare", str(path), "--data-dir", "data", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: {shared_data / 'alpaca' / 'alpaca_sample.json'}: record {EMPTY_OUTPUTS[0]}: "
        "'output' is empty; every record needs a response (or set skip_empty_output = true "
        "to leave such records out)"
    ]


GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}
BAD_FILES = {
    "missing field": (
        ".json",
        json.dumps([GOOD, {"instruction": "x", "output": "y"}]),
        "record 2: has no 'input' field (it has: instruction, output)",
    ),
    "not a string": (
        ".json",
        json.dumps([GOOD, GOOD, {**GOOD, "output": 7}]),
        "record 3: 'output' is int, expected text",
    ),
    "empty output in jsonl": (
        ".jsonl",
        "\n".join(json.dumps(r) for r in [GOOD, {**GOOD, "output": "  "}]),
        "line 2: 'output' is empty; every record needs a response",
    ),
    "not json": (".json", "[{'instruction': 1}]", "not valid JSON (line 1, column 3"),
    "not an array": (".json", json.dumps(GOOD), "expected a JSON array of records, got a dict"),
    "bad jsonl line": (".jsonl", json.dumps(GOOD) + "\n{oops\n", "line 2: not valid JSON"),
    "not an object": (".json", json.dumps([GOOD, "text"]), "record 2: expected an object with"),
    "wrong file type": (".txt", "hello", "unsupported file type .txt"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_record_is_one_line_through_gpt_prepare(case, tmp_path):
    suffix, content, message = BAD_FILES[case]
    bad = tmp_path / f"bad{suffix}"
    bad.write_text(content)
    result = gpt("prepare", str(experiment(tmp_path, [bad])), "--data-dir", "data", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"Error: {bad}: ") and message in lines[0], lines[0]
    assert not (tmp_path / "data" / "alpaca" / "local-gpt2" / "meta.json").exists()


def test_a_parquet_without_a_field_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "x", "output": "y"}]), bad)
    with pytest.raises(DataError, match=r"bad.parquet: record 1: has no 'input' field"):
        prepare(experiment(tmp_path, [bad]), tmp_path)


def test_truncation_keeps_responses_whole_and_is_reported(shared_data, tmp_path):
    sample = shared_data / "alpaca"
    path = experiment(
        tmp_path, [sample / "alpaca_sample.jsonl"], [sample / "alpaca_sample.jsonl"], 64
    )
    result = gpt("prepare", str(path), "--data-dir", "data", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    prepared = open_prepared(tmp_path / "data" / "alpaca" / "local-gpt2")
    counts = prepared.meta["splits"]["train"]
    gpt2 = GPT2Tokenizer()
    kept, truncated, dropped = [], 0, 0
    for record in records(sample / "alpaca_sample.jsonl"):
        prompt = AlpacaTemplate().prompt(record["instruction"], record["input"])
        prompt_ids, response = gpt2.encode(prompt), [*gpt2.encode(record["output"]), 50256]
        if len(response) >= 65:
            dropped += 1
            continue
        truncated += len(prompt_ids) + len(response) > 65
        kept.append(prompt_ids[-(65 - len(response)) :] + response)
    assert (counts["truncated"], counts["dropped"]) == (truncated, dropped)
    assert truncated > 50 and dropped > 50
    tokens = np.fromfile(prepared.split_path("train"), dtype=prepared.dtype)
    assert [tokens[s : s + n].tolist() for s, n, _ in prepared.examples("train")] == kept
    assert prepared.examples("train")[:, 1].max() <= 65
    assert (
        f"dataset plugin 'alpaca': cut to model.block_size = 64: train {truncated} truncated, "
        f"{dropped} dropped; val {truncated} truncated, {dropped} dropped"
    ) in result.stderr


def test_hub_rows_are_held_out_by_hash(shared_data, tmp_path, monkeypatch):
    rows = records(shared_data / "alpaca" / "alpaca_sample.jsonl")
    calls = []

    def fake_hub(name, subset, split):
        calls.append((name, subset, split))
        yield from ({**r, "text": "ignored"} for r in rows)

    monkeypatch.setattr(alpaca, "hub_rows", fake_hub)
    for name, variant in (
        ("tatsu-lab/alpaca", "hub-tatsu-lab--alpaca-gpt2"),
        ("yahma/alpaca-cleaned", "hub-yahma--alpaca-cleaned-gpt2"),
    ):
        path = tmp_path / "hub.toml"
        path.write_text(
            f'[dataset]\nplugin = "alpaca"\nhub_name = "{name}"\nval_fraction = 0.1\n'
            "[model]\nblock_size = 512\n"
        )
        prepared = prepare(path, tmp_path)
        assert prepared.folder == tmp_path / "data" / "alpaca" / variant
        val = [r for r in rows if held_out(r, 1337, 0.1)]
        assert decoded_examples(prepared, "val") == expected(val)
        assert prepared.meta["splits"]["train"]["documents"] == len(rows) - len(val)
    assert calls == [("tatsu-lab/alpaca", None, "train"), ("yahma/alpaca-cleaned", None, "train")]


def test_a_bad_hub_row_names_the_dataset_and_row(tmp_path, monkeypatch):
    monkeypatch.setattr(alpaca, "hub_rows", lambda *a: iter([GOOD, {**GOOD, "input": None}]))
    source = AlpacaSource(AlpacaOptions())
    with pytest.raises(DataError, match=r"^tatsu-lab/alpaca \(hub\): row 2: 'input' is NoneType"):
        list(source.split_examples(tmp_path))


def test_offline_hub_is_one_line_pointing_at_local(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'tatsu-lab/alpaca' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r'could not read tatsu-lab/alpaca .* use source = "local"'):
        list(AlpacaSource(AlpacaOptions()).split_examples(tmp_path))


def test_a_val_fraction_that_holds_nothing_out_says_so(tmp_path):
    file = tmp_path / "few.json"
    file.write_text(json.dumps([{**GOOD, "output": f"Hi {i}."} for i in range(5)]))
    path = experiment(tmp_path, [file], extra="val_fraction = 0.001\n")
    with pytest.raises(DataError, match="none of the 5 records went to validation"):
        prepare(path, tmp_path)


def test_max_examples_stops_reading_the_hub_after_the_first_records(
    local_hub, shared_data, tmp_path, capfd
):
    # tatsu-lab/alpaca's rows are alpaca_data.json's records, in its order.
    sample = shared_data / "alpaca" / "alpaca_sample.json"
    local_hub.serve("tatsu-lab/alpaca", "train", sample)
    source = AlpacaSource(AlpacaOptions(max_examples=300, skip_empty_output=True))
    pairs = list(source.split_examples(tmp_path))
    kept = non_empty(records(sample)[:301])  # record 285 has an empty output
    assert [record for _, record in pairs] == kept and len(kept) == 300
    assert [r for split, r in pairs if split == "val"] == [
        r for r in kept if held_out(r, 1337, 0.02)
    ]
    # Streamed, and no row asked for past the 300th record kept.
    assert local_hub.calls == [("tatsu-lab/alpaca", None, "train", True)]
    assert local_hub.served == {"train": 301} and local_hub.closed == ["train"]
    assert "alpaca: left out 1 records with an empty output" in capfd.readouterr().err
    assert source.variant == "hub-tatsu-lab--alpaca-gpt2-first300"
    assert (
        source.description == "Alpaca from the Hugging Face hub (tatsu-lab/alpaca) (the first 300)"
    )


def test_max_examples_caps_train_files_and_leaves_val_files_whole(shared_data, tmp_path):
    sample = shared_data / "alpaca"
    files = [sample / "alpaca_sample.json"], [sample / "alpaca_sample.jsonl"]
    capped = prepare(experiment(tmp_path, *files, extra="max_examples = 40\n"), tmp_path)
    assert capped.folder == tmp_path / "data" / "alpaca" / "local-gpt2-first40"
    assert decoded_examples(capped, "train") == expected(records(files[0][0])[:40])
    assert capped.meta["splits"]["val"]["documents"] == 500
    # Uncapped, the same files prepare into a folder of their own.
    whole = prepare(experiment(tmp_path, *files, extra="skip_empty_output = true\n"), tmp_path)
    assert whole.folder == tmp_path / "data" / "alpaca" / "local-gpt2"
    assert whole.meta["splits"]["train"]["documents"] == 2000 - len(EMPTY_OUTPUTS)
    assert whole.meta["fingerprint"] != capped.meta["fingerprint"]
    assert (capped.folder / "meta.json").is_file()  # still there, as it was
