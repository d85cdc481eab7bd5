"""HellaSwag: our scores equal an independent reference over transformers' GPT2LMHeadModel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt_plugins.evals.hellaswag import HellaSwag, HellaSwagOptions, parse_row

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

BLOCK_SIZE = 128

EXPERIMENT = """
name = "hs"
seed = 3

[dataset]
plugin = "tinystories"
source = "local"
train_files = ["{data}/tinystories/derived_train.jsonl"]
val_files = ["{data}/tinystories/derived_validation.jsonl"]

[tokenizer]
plugin = "huggingface"
path = "tok.json"

[model]
n_layer = 2
n_head = 2
n_embd = 48
block_size = {block_size}

[train]
batch_size = 16
steps_per_epoch = 60
learning_rate = 1e-2
min_lr = 1e-3
warmup_steps = 5
eval_every = 60
eval_batches = 2

[[callbacks]]
plugin = "checkpoint"
"""


def gpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "nanogpt_core", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def train_tokenizer(shared: Path, path: Path) -> None:
    """A small byte-level BPE (GPT-2's pre-tokenizer and end-of-text) learned on TinyStories."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [
        json.loads(line)["text"]
        for line in (shared / "tinystories" / "derived_train.jsonl").read_text().splitlines()[:800]
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny model trained with `gpt run` in a fresh folder; returns the folder."""
    # ../shared/data beside the repository, as the shared_data fixture finds it.
    SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    folder = tmp_path_factory.mktemp("hellaswag")
    train_tokenizer(SHARED_DATA, folder / "tok.json")
    (folder / "hs.toml").write_text(EXPERIMENT.format(data=SHARED_DATA, block_size=BLOCK_SIZE))
    done = gpt("run", "hs.toml", cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


def reference_scores(export: Path, rows: list[dict]) -> tuple[float, float]:
    """llm.c's scoring, written here independently over GPT2LMHeadModel's logits."""
    import torch
    from torch.nn import functional as F
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    correct = correct_norm = 0
    for row in rows:
        context = tokenizer.encode(row["ctx"], add_special_tokens=False)
        sums, means = [], []
        for ending in row["endings"]:
            tail = tokenizer.encode(" " + ending, add_special_tokens=False)
            tokens = (context + tail)[-(BLOCK_SIZE + 1) :]  # the context keeps its last tokens
            ids = torch.tensor([tokens])
            with torch.no_grad():
                logits = model(ids[:, :-1]).logits[0]
            losses = F.cross_entropy(logits, ids[0, 1:], reduction="none")[-len(tail) :]
            sums.append(losses.sum().item())
            means.append(losses.mean().item())
        label = int(row["label"])
        correct += int(torch.tensor(sums).argmin()) == label
        correct_norm += int(torch.tensor(means).argmin()) == label
    return correct / len(rows), correct_norm / len(rows)


@pytest.mark.slow
def test_scores_equal_the_transformers_reference_and_two_processes(trained, shared_data):
    sample = shared_data / "hellaswag" / "hellaswag_val_sample.jsonl"
    rows = [json.loads(line) for line in sample.read_text().splitlines()]
    ckpt = "results/hs/checkpoints/last.pth"
    exported = gpt("export", "--ckpt", ckpt, "--out", "export", cwd=trained)
    assert exported.returncode == 0, exported.stderr

    ours = gpt(
        "eval", "--ckpt", ckpt, "--task", "hellaswag", "--data", str(sample), "--json", cwd=trained
    )
    assert ours.returncode == 0, ours.stderr
    result = json.loads(ours.stdout)["tasks"]["hellaswag"]
    assert result["n"] == len(rows) == 500
    # block_size 128 is shorter than some contexts: those keep their last tokens.
    assert result["notes"] and "kept their last tokens" in result["notes"][0]

    acc, acc_norm = reference_scores(trained / "export", rows)
    assert result["metrics"] == {"acc": acc, "acc_norm": acc_norm}
    # Trained a little on stories, it does better than chance.
    assert acc_norm > 0.25

    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541"]
    command = [*launch, "-m", "nanogpt_core", "eval", "--ckpt", ckpt, "--task", "hellaswag"]
    command += ["--data", str(sample), "--json", "--batch-size", "8"]
    two = subprocess.run(command, cwd=trained, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    # One JSON object, printed by the main process only, with the same numbers.
    assert json.loads(two.stdout)["tasks"]["hellaswag"]["metrics"] == result["metrics"]


def test_rows_are_checked_one_line_each(tmp_path):
    where = "f.jsonl: row 3"
    good = {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": "2"}
    assert parse_row(good, where) == ("A man", ["a", "b", "c", "d"], 2)
    for bad, message in (
        ({**good, "label": 4}, "label 4 is not the index of an ending"),
        ({**good, "label": True}, "label True"),
        ({**good, "endings": "abcd"}, "endings must be a list"),
        ({**good, "endings": ["a", ""]}, "endings must be a list"),
        ({**good, "ctx": 3}, "ctx is int"),
    ):
        with pytest.raises(Exception, match=message) as info:
            parse_row(bad, where)
        assert str(info.value).startswith(where)
    missing = HellaSwag(HellaSwagOptions(data=str(tmp_path / "nope.jsonl")))
    with pytest.raises(Exception, match="no such file"):
        list(missing.rows(None))
