"""Instruction tuning end to end: examples in, a model that answers out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from nanogpt_core.train.checkpoints import load_checkpoint
from nanogpt_core.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[3]


def gpt(*args: str, cwd: Path, stdin: str | None = None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def short_records(shared: Path, count: int = 64) -> list[dict]:
    """Alpaca records with no input and a short one-line answer (memorisable quickly)."""
    records = json.loads((shared / "alpaca" / "alpaca_sample.json").read_text())
    chosen, seen = [], set()
    for record in records:
        instruction, output = record["instruction"], record["output"]
        if record["input"] or "\n" in instruction or "\n" in output or len(output) > 40:
            continue
        if instruction in seen:
            continue
        seen.add(instruction)
        chosen.append(record)
        if len(chosen) == count:
            break
    assert len(chosen) == count
    return chosen


def train_tokenizer(records: list[dict], path: Path) -> None:
    """A small byte-level BPE for these records, with GPT-2's end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    from nanogpt_core.data.templates import template_from_description

    template = template_from_description({"kind": "alpaca"})
    texts = [template.prompt(r["instruction"], r["input"]) + r["output"] for r in records]
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))


MEMORISE = """
name = "memo"
seed = 7

[dataset]
plugin = "alpaca"
source = "local"
train_files = ["memo.json"]
val_files = ["memo.json"]

[tokenizer]
plugin = "huggingface"
path = "tok.json"

[model]
n_layer = 2
n_head = 4
n_embd = 128
block_size = 128

[train]
batch_size = 16
epochs = 90
learning_rate = 3e-3
min_lr = 3e-4
warmup_steps = 20
weight_decay = 0.0
eval_every = 100000
eval_batches = 4
log_every = 20
device = "cpu"

[[callbacks]]
plugin = "checkpoint"
"""


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A tiny model fine-tuned until it knows 64 examples by heart (about a minute)."""
    shared = REPO.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip(f"real data samples not found at {shared}")
    folder = tmp_path_factory.mktemp("memo")
    records = short_records(shared)
    (folder / "memo.json").write_text(json.dumps(records))
    train_tokenizer(records, folder / "tok.json")
    (folder / "memo.toml").write_text(MEMORISE)
    result = gpt("run", "memo.toml", cwd=folder, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, records


@pytest.mark.slow
def test_a_tiny_model_answers_the_examples_it_was_tuned_on(memorised):
    folder, records = memorised
    last = folder / "results" / "memo" / "checkpoints" / "last.pth"
    questions = "".join(r["instruction"] + "\n" for r in records)
    result = gpt("chat", "--ckpt", str(last), "--temperature", "0", cwd=folder, stdin=questions)
    assert result.returncode == 0, result.stderr
    answers = result.stdout.rstrip("\n").split("\n\n")
    assert len(answers) == len(records), result.stdout[:2000]
    right = sum(a.strip() == r["output"].strip() for a, r in zip(answers, records, strict=True))
    assert right >= 0.9 * len(records), f"{right}/{len(records)} answered exactly"
    # One more through --once, as a user would ask.
    once = gpt(
        "chat", "--ckpt", str(last), "--temperature", "0", "--once", records[0]["instruction"],
        cwd=folder,
    )  # fmt: skip
    assert once.returncode == 0, once.stderr
    assert once.stdout.strip() == answers[0].strip()


@pytest.mark.slow
def test_fine_tuning_metrics_count_response_tokens_and_padding(memorised):
    folder, _ = memorised
    records, torn = read_metrics(folder / "results" / "memo" / "metrics.jsonl")
    assert torn == 0 and records
    for record in records:
        assert record["response_tokens_per_sec"] > 0
        assert 0 <= record["padding_share"] < 1
        assert record["tokens_per_sec"] >= record["response_tokens_per_sec"]
    # 64 examples / 16 per batch: 4 steps per epoch, 90 epochs.
    assert records[-1]["step"] == 360 and records[-1]["epoch"] == 90
    assert records[-1]["val_loss"] < 0.5  # memorised: val is the same 64 examples
    # tokens counts real tokens, not padding: each example's inputs (length - 1), 90 times.
    examples = np.load(next(folder.rglob("train.examples.npy")))
    assert records[-1]["tokens"] == 90 * int((examples[:, 1] - 1).sum())
    checkpoint = load_checkpoint(folder / "results" / "memo" / "checkpoints" / "last.pth")
    assert checkpoint["template"]["kind"] == "alpaca"


def finetune_toml(name: str, extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        name = "{name}"
        [dataset]
        plugin = "alpaca"
        source = "local"
        train_files = ["{REPO.parent / "shared" / "data" / "alpaca" / "alpaca_sample.jsonl"}"]
        [model]
        n_layer = 1
        n_head = 2
        n_embd = 32
        block_size = 96
        [train]
        batch_size = 8
        epochs = 2
        learning_rate = 1e-3
        warmup_steps = 2
        eval_every = 10
        eval_batches = 2
        log_every = 1
        device = "cpu"
        """
    ) + textwrap.dedent(extra)


@pytest.mark.slow
def test_exact_resume_after_sigkill_mid_epoch(shared_data, tmp_path):
    extra = '[[callbacks]]\nplugin = "checkpoint"\nevery_steps = 5\n'
    (tmp_path / "ft.toml").write_text(finetune_toml("ft", extra))
    limit = ["--set", "train.steps_per_epoch=12", "--set", "train.eval_every=6"]
    args = ["run", "ft.toml", "--data-dir", "data", *limit]
    straight = gpt(*args, "--results-dir", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanogpt_core", *args, "--results-dir", "killed"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as the other runs: same float sums
    )  # fmt: skip
    last = tmp_path / "killed" / "ft" / "checkpoints" / "last.pth"
    deadline = time.monotonic() + 300
    while not last.exists():  # the first save is at step 5, inside epoch 1
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = load_checkpoint(last, resume=True)
    assert (
        saved["ranks"][0]["sampler"]["epoch"] == 0 and saved["ranks"][0]["sampler"]["position"] > 0
    )
    resumed = gpt(*args, "--results-dir", "killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step" in resumed.stdout

    def losses(root: str) -> list:
        rows, _ = read_metrics(tmp_path / root / "ft" / "metrics.jsonl")
        return [(r["step"], r["train_loss"], r.get("val_loss"), r["lr"], r["tokens"]) for r in rows]

    assert losses("killed") == losses("straight")


@pytest.mark.slow
def test_compile_compiles_a_few_graphs_for_batches_of_many_widths(
    shared_data, installed_plugins, tmp_path, monkeypatch
):
    """``train.compile`` on fine-tuning batches, padded to their longest example: few compiles.

    torch's automatic dynamic shapes compile the first width as it is, recompile
    with the width symbolic when a second width comes and with the batch size
    symbolic at a short batch (the epoch's last; the validation split's last);
    training and evaluation (no grad) each get their own graphs. So at most 3
    per grad mode, however many widths. Measured here (57 batches of 36 widths,
    evaluations every 10 steps): 5 graphs; 4 over two epochs of 43 widths with a
    final evaluation only. Were each width compiled anew, dynamo would stop at its
    recompile limit of 8 and run the rest uncompiled.
    """
    import torch
    from torch._dynamo.utils import counters

    from nanogpt_core.config.experiment_file import load_experiment
    from nanogpt_core.data.example_batches import ExampleBatches
    from nanogpt_core.train.run import run_experiment

    shapes: list[tuple[int, int]] = []
    collate = ExampleBatches.collate

    def recording(self, indices):
        x, y = collate(self, indices)
        if self.group_by_length:  # training batches; evaluation batches are not grouped
            shapes.append(tuple(x.shape))
        return x, y

    monkeypatch.setattr(ExampleBatches, "collate", recording)
    (tmp_path / "ft.toml").write_text(finetune_toml("ft_compile"))
    # 400 examples in batches of 7: the epoch's last batch holds one.
    overrides = ["train.compile=true", "train.batch_size=7", "train.epochs=1"]
    config = load_experiment(tmp_path / "ft.toml", overrides, installed_plugins)
    torch._dynamo.reset()  # no graphs, and no sizes seen, from earlier tests
    counters.clear()
    try:
        run_experiment(
            config,
            installed_plugins,
            results_dir=tmp_path / "results",
            data_dir=tmp_path / "data",
            progress=False,
        )
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert len({width for _, width in shapes}) >= 10
    assert min(rows for rows, _ in shapes) < 7
    assert 2 <= graphs <= 6, graphs


@pytest.mark.slow
def test_init_from_a_toolkit_checkpoint_checks_shape_and_tokenizer(shared_data, tmp_path):
    # A "pre-trained" model: the same shape and GPT-2 tokenizer, trained on TinyStories rows.
    ts = shared_data / "tinystories"
    pretrain = textwrap.dedent(
        f"""
        name = "pre"
        [dataset]
        plugin = "tinystories"
        source = "local"
        train_files = ["{ts / "derived_train.parquet"}"]
        val_files = ["{ts / "derived_validation.jsonl"}"]
        [model]
        n_layer = 1
        n_head = 2
        n_embd = 32
        block_size = 128
        [train]
        batch_size = 4
        steps_per_epoch = 5
        eval_batches = 1
        device = "cpu"
        [[callbacks]]
        plugin = "checkpoint"
        """
    )
    (tmp_path / "pre.toml").write_text(pretrain)
    assert gpt("run", "pre.toml", "--data-dir", "data", cwd=tmp_path).returncode == 0
    pre = tmp_path / "results" / "pre" / "checkpoints" / "last.pth"
    extra = '[[callbacks]]\nplugin = "checkpoint"\n'
    toml = finetune_toml("ft", extra).replace(
        "block_size = 96", f'block_size = 96\ninit_from = "{pre}"'
    )
    (tmp_path / "ft.toml").write_text(toml)
    short = ["--set", "train.steps_per_epoch=3", "--set", "train.epochs=1"]
    result = gpt("run", "ft.toml", "--data-dir", "data", *short, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model.init_from: weights of step 5 of" in result.stdout
    # The fine-tuned run resumes from its own last.pth, never from init_from again.
    again = gpt(
        "run", "ft.toml", "--data-dir", "data", "--set", "train.steps_per_epoch=3",
        "--set", "train.epochs=2", cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from step 3" in again.stdout and "init_from" not in again.stdout
    # A different shape or tokenizer is exit 2 with what differs.
    wider = gpt(
        "run", "ft.toml", "--data-dir", "data", "--fresh", "--set", "model.n_embd=64",
        *short, cwd=tmp_path,
    )  # fmt: skip
    assert wider.returncode == 2
    assert wider.stderr.strip().splitlines()[-1] == (
        f"Error: model.init_from: model.n_embd = 64 but {pre} has 32"
    )
    # A char-level model of the same shape (its vocabulary padded to GPT-2's size).
    text = shared_data / "tinyshakespeare" / "input.txt"
    char_pre = pretrain.replace('name = "pre"', 'name = "pre_char"').replace(
        '[dataset]\nplugin = "tinystories"', f'[dataset]\nplugin = "shakespeare"\npath = "{text}"'
    )
    char_pre = "\n".join(
        line
        for line in char_pre.splitlines()
        if not line.startswith(("source", "train_files", "val_files"))
    ).replace("block_size = 128", "block_size = 128\nvocab_size = 50304")
    (tmp_path / "pre_char.toml").write_text(char_pre)
    made = gpt("run", "pre_char.toml", "--data-dir", "data", cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    char_ckpt = tmp_path / "results" / "pre_char" / "checkpoints" / "last.pth"
    char = gpt(
        "run", "ft.toml", "--data-dir", "data", "--fresh", "--set",
        f'model.init_from="{char_ckpt}"', *short, cwd=tmp_path,
    )  # fmt: skip
    assert char.returncode == 2
    assert char.stderr.strip().splitlines()[-1] == (
        "Error: model.init_from: tokenizer 'char' in the checkpoint, 'gpt2' now "
        "(the dataset's tokenizer must be the checkpoint's)"
    )


@pytest.mark.slow
def test_two_processes_see_disjoint_examples(shared_data, tmp_path):
    (tmp_path / "ft.toml").write_text(finetune_toml("ddp_ft").replace("epochs = 2", "epochs = 1"))
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    probe = tmp_path / "probe"
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
        str(Path(__file__).with_name("finetune_probe.py")),
        str(tmp_path / "ft.toml"), str(tmp_path / "results"), str(tmp_path / "data"), str(probe),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    flat = [sorted(i for batch in rank for i in batch) for rank in ranks]
    assert len(ranks[0]) == len(ranks[1])  # the same number of steps on both
    assert not set(flat[0]) & set(flat[1])
    meta = json.loads(next((tmp_path / "data").rglob("meta.json")).read_text())
    assert sorted(flat[0] + flat[1]) == list(range(meta["splits"]["train"]["examples"]))
    # tokens counts both processes' real tokens: each train example's inputs, once.
    examples = np.load(next((tmp_path / "data").rglob("train.examples.npy")))
    rows, _ = read_metrics(tmp_path / "results" / "ddp_ft" / "metrics.jsonl")
    assert rows[-1]["tokens"] == int((examples[:, 1] - 1).sum())
