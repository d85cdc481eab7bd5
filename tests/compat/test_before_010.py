"""A plugin written as the README of commit b4fbd97 documented (before 0.1.0) still works.

That README's kinds were datasets, callbacks and commands; its dataset defines
only ``split_documents(downloads)``, the README's alternative to ``documents``
(refused from 0.2.0 until API 1.1.0), and it reads files with
``nanogpt_core.documents``, which moved in 0.2.0 and now warns until API 2.0.
"""

from __future__ import annotations

import json

import pytest

EXPERIMENT = """
name = "early"
seed = 1

[dataset]
plugin = "compat_words"
documents = 300

[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 32

[train]
batch_size = 4
epochs = 1
steps_per_epoch = 6
warmup_steps = 2
eval_every = 3
eval_batches = 2
log_every = 3

[[callbacks]]
plugin = "compat_tally"
"""


DEPRECATION = (
    "Warning: plugin 'compat_early' (nanogpt-compat-early 0.1.0) imports nanogpt_core.documents, "
    "which plugin API 2.0 removes: import expand_files, read_rows, read_texts and hub_rows "
    "from nanogpt_core instead"
)


def test_it_is_listed_with_its_dataset_callback_and_command(gpt_compat, tmp_path):
    listed = gpt_compat("plugins", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr.splitlines() == [DEPRECATION]
    entry = {p["name"]: p for p in json.loads(listed.stdout)}["compat_early"]
    assert (entry["distribution"], entry["version"]) == ("nanogpt-compat-early", "0.1.0")
    assert entry["hooks"] == ["register_callbacks", "register_commands", "register_datasets"]
    assert [(r["kind"], r["name"]) for r in entry["registers"]] == [
        ("dataset", "compat_words"),
        ("callback", "compat_tally"),
    ]
    assert entry["warnings"] == [DEPRECATION[len("Warning: ") :]]
    assert entry["api_declared"] is None
    command = gpt_compat("compat-early", cwd=tmp_path)
    assert (command.returncode, command.stdout) == (0, "compat-early: command ran\n")
    assert command.stderr.splitlines() == [DEPRECATION]


def test_its_split_documents_only_dataset_prepares(gpt_compat, tmp_path):
    (tmp_path / "early.toml").write_text(EXPERIMENT)
    prepared = gpt_compat("prepare", "early.toml", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    meta = json.loads((tmp_path / "data" / "compat_words" / "words300" / "meta.json").read_text())
    splits = meta["splits"]
    # Held out by a hash of each text: both splits have documents, together all 300.
    assert splits["train"]["documents"] > 0 and splits["val"]["documents"] > 0
    assert splits["train"]["documents"] + splits["val"]["documents"] == 300


@pytest.mark.slow
def test_it_trains_resumes_and_its_callback_keeps_its_state(gpt_compat, tmp_path):
    (tmp_path / "early.toml").write_text(EXPERIMENT)
    first = gpt_compat("run", "early.toml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    tally = tmp_path / "results" / "early" / "tally.json"
    assert json.loads(tally.read_text())["counts"] == {
        "train_start": 1,
        "step_end": 6,
        "eval_end": 2,
        "epoch_end": 1,
    }
    resumed = gpt_compat("run", "early.toml", "--set", "train.epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 6 (epoch 1)" in resumed.stdout
    record = json.loads(tally.read_text())
    # The callback's own state came back from the checkpoint: its counts go on.
    assert record["counts"] == {"train_start": 2, "step_end": 12, "eval_end": 4, "epoch_end": 2}
    assert (record["status"], record["step"]) == ("completed", 12)
    lines = (tmp_path / "results" / "early" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 6, 9, 12]


def test_it_still_reads_files_through_the_deprecated_module(gpt_compat, tmp_path):
    stories = "".join(f"Story {i}.\n<|endoftext|>\n" for i in range(40))
    (tmp_path / "stories.txt").write_text(stories)
    (tmp_path / "early.toml").write_text(EXPERIMENT)
    prepared = gpt_compat(
        "prepare", "early.toml", "--set", "dataset.path=stories.txt", "--set",
        "dataset.val_percent=50", cwd=tmp_path,
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr
    meta = json.loads((tmp_path / "data" / "compat_words" / "file" / "meta.json").read_text())
    # The file's 40 stories, without their separators, and nothing generated.
    assert meta["tokenizer"]["chars"] == " .0123456789Sorty"
    assert sum(s["documents"] for s in meta["splits"].values()) == 40
