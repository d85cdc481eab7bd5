"""A plugin of every kind, written as the README of release 0.1.0 (commit 85769ce) documented.

Its tokenizer, template, datasets (documents and examples), callback, eval task,
optimizer, schedule and command are used together: listed, prepared, trained,
resumed, evaluated, chatted with, and the command run.
"""

from __future__ import annotations

import json

import pytest

EXPERIMENT = """
name = "v010"
seed = 1

[dataset]
plugin = "compat_sums"
documents = 300

[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 32

[train]
batch_size = 4
epochs = 1
steps_per_epoch = 8
learning_rate = 0.01
min_lr = 0.001
warmup_steps = 2
eval_every = 4
eval_batches = 2
log_every = 4
optimizer = "compat_sgd"
schedule = "compat_step"

[train.compat_sgd]
momentum = 0.8

[train.compat_step]
drop_at = 0.75

[eval.compat_sums]
questions = 4

[[callbacks]]
plugin = "compat_audit"

[[callbacks]]
plugin = "eval"
tasks = ["compat_sums"]
every_steps = 4
"""

EXAMPLES = """
name = "qa"
seed = 1

[dataset]
plugin = "compat_sums_qa"
documents = 200

[template]
plugin = "compat_qa"
question = "Sum"

[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 32

[train]
batch_size = 4
steps_per_epoch = 4
warmup_steps = 1
eval_every = 4
eval_batches = 1
"""


def test_every_kind_is_listed_and_the_command_runs(gpt_compat, tmp_path):
    listed = gpt_compat("plugins", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "compat_010" not in listed.stderr
    entry = {p["name"]: p for p in json.loads(listed.stdout)}["compat_010"]
    assert (entry["distribution"], entry["version"]) == ("nanogpt-compat-010", "0.1.0")
    assert sorted((r["kind"], r["name"]) for r in entry["registers"]) == [
        ("callback", "compat_audit"),
        ("dataset", "compat_sums"),
        ("dataset", "compat_sums_qa"),
        ("eval_task", "compat_sums"),
        ("optimizer", "compat_sgd"),
        ("schedule", "compat_step"),
        ("template", "compat_qa"),
        ("tokenizer", "compat_bytes"),
    ]
    assert entry["warnings"] == [] and entry["shadowed_commands"] == []
    command = gpt_compat("compat-010", cwd=tmp_path)
    assert (command.returncode, command.stdout) == (0, "compat-010: command ran\n")


def test_its_options_are_checked_and_resolved(gpt_compat, tmp_path):
    (tmp_path / "v010.toml").write_text(EXPERIMENT)
    dry = gpt_compat("run", "v010.toml", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    train = json.loads(dry.stdout)["train"]
    assert train["compat_sgd"] == {"momentum": 0.8, "lr_scale": 1.0}
    assert train["compat_step"] == {"drop_at": 0.75, "shape": "step"}
    bad = gpt_compat("run", "v010.toml", "--set", "train.compat_sgd.momentum=-1", cwd=tmp_path)
    assert bad.returncode == 2
    assert "train.compat_sgd.momentum" in bad.stderr and "Traceback" not in bad.stderr


def test_its_tokenizer_and_template_prepare_documents_and_examples(gpt_compat, tmp_path):
    (tmp_path / "v010.toml").write_text(EXPERIMENT)
    (tmp_path / "qa.toml").write_text(EXAMPLES)
    for name in ("v010.toml", "qa.toml"):
        prepared = gpt_compat("prepare", name, cwd=tmp_path)
        assert prepared.returncode == 0, prepared.stderr
    meta = json.loads((tmp_path / "data" / "compat_sums" / "sums30" / "meta.json").read_text())
    assert meta["tokenizer"] == {"kind": "compat_bytes", "vocab_size": 257}
    assert meta["splits"]["train"]["documents"] == 300
    (examples,) = (tmp_path / "data" / "compat_sums_qa").glob("qa30.compat_qa-*/meta.json")
    qa_meta = json.loads(examples.read_text())
    assert qa_meta["template"] == {"kind": "compat_qa", "question": "Sum"}
    assert qa_meta["splits"]["train"]["examples"] == 200


@pytest.mark.slow
def test_it_trains_resumes_and_evaluates(gpt_compat, tmp_path):
    (tmp_path / "v010.toml").write_text(EXPERIMENT)
    first = gpt_compat("run", "v010.toml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = gpt_compat("run", "v010.toml", "--set", "train.epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 8 (epoch 1)" in resumed.stdout
    run = tmp_path / "results" / "v010"
    audit = json.loads((run / "audit.json").read_text())
    assert (audit["status"], audit["step"]) == ("completed", 16)
    assert audit["seen"]["steps"] == 16 and audit["seen"]["train_starts"] == 2
    assert (run / "checkpoints" / "audit.pth").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # The schedule: the peak until 3/4 of the steps, then the floor.
    assert [(r["step"], r["lr"]) for r in records if "lr" in r] == [
        (4, 0.01),
        (8, 0.001),
        (12, 0.01),
        (16, 0.001),
    ]
    logged = [r for r in records if "compat/steps_seen" in r]
    assert [(r["step"], r["compat/steps_seen"]) for r in logged] == [
        (4, 4),
        (8, 8),
        (12, 12),
        (16, 16),
    ]
    assert all("eval/compat_sums/acc" in r for r in logged)
    evaluated = gpt_compat(
        "eval", "--ckpt", str(run / "checkpoints" / "last.pth"), "--task", "compat_sums",
        "--experiment", "v010.toml", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert "compat_sums" in json.loads(evaluated.stdout)["tasks"]


@pytest.mark.slow
def test_its_examples_train_and_chat_through_its_template(gpt_compat, tmp_path):
    (tmp_path / "qa.toml").write_text(EXAMPLES)
    trained = gpt_compat("run", "qa.toml", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    checkpoint = tmp_path / "results" / "qa" / "checkpoints" / "last.pth"
    chat = gpt_compat(
        "chat", "--ckpt", str(checkpoint), "--once", "1 + 2", "--max-new-tokens", "4",
        "--temperature", "0", cwd=tmp_path,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert "Traceback" not in chat.stderr
