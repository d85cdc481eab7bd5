"""Bad experiment input through the real `gpt` command: one line, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATASET = '[dataset]\nplugin = "shakespeare"\n'


def gpt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m nanogpt_core ARGS`` in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        (f"train = []\n{DATASET}", [], "train: expected a table, got an array"),
        (f"{DATASET}[[model]]\nn_layer = 2\n", [], "model: expected a table, got an array"),
        ('dataset = "x"\n', [], 'dataset: expected a table, got "x"'),
        (DATASET, ["dataset=x"], 'dataset: expected a table, got "x"'),
        (f"callbacks = {{}}\n{DATASET}", [], "callbacks: expected an array, got a table"),
        (DATASET, ["train=3"], "train: expected a table, got 3"),
        (
            f"seed = -1\n{DATASET}",
            [],
            "seed: -1 is outside numpy's seed range; use 0 to 4294967295",
        ),
        (DATASET, ["seed=4294967296"], "seed: 4294967296 is outside numpy's seed range"),
        (
            f"{DATASET}[train]\nlearning_rate = nan\n",
            [],
            "train.learning_rate: expected a finite number, got nan",
        ),
        (DATASET, ["train.min_lr=inf"], "train.min_lr: expected a finite number, got inf"),
        (DATASET, ["model.dropout=-inf"], "model.dropout: expected a finite number, got -inf"),
        (
            f'name = "exp\\n"\n{DATASET}',
            [],
            'name: "exp\\n" is not usable as a folder name under results/',
        ),
        (
            f'name = "{"n" * 300}"\n{DATASET}',
            [],
            "name: 300 characters is too long for a folder name under results/; use at most 223",
        ),
        (f"tokenizer = 3\n{DATASET}", [], "tokenizer: expected a table, got 3"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, text, overrides, expected):
    (tmp_path / "exp.toml").write_text(text)
    sets = [arg for override in overrides for arg in ("--set", override)]
    result = gpt("run", "exp.toml", "--dry-run", *sets, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: exp.toml: {expected}")
    assert result.stdout == ""


def test_dry_run_shows_paths_resolved_against_the_file_that_set_them(tmp_path):
    (tmp_path / "bases").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "bases" / "base.toml").write_text(
        'abstract = true\n[dataset]\nplugin = "tinystories"\nsource = "local"\n'
        'train_files = ["stories/*.txt"]\n[model]\ninit_from = "~/gpt2"\n'
    )
    (tmp_path / "runs" / "exp.toml").write_text(
        'extends = "../bases/base.toml"\n[dataset]\nval_files = ["val.jsonl", "/data/v.jsonl"]\n'
    )
    result = gpt("run", "runs/exp.toml", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["dataset"]["train_files"] == [str(tmp_path / "bases" / "stories" / "*.txt")]
    assert shown["dataset"]["val_files"] == [str(tmp_path / "runs" / "val.jsonl"), "/data/v.jsonl"]
    assert shown["model"]["init_from"] == str(Path("~/gpt2").expanduser())
    # --set speaks for the shell it was typed in.
    result = gpt(
        "run", "runs/exp.toml", "--dry-run", "--set", "dataset.train_files=['a.txt']", cwd=tmp_path
    )
    assert json.loads(result.stdout)["dataset"]["train_files"] == [str(tmp_path / "a.txt")]


def test_shakespeare_path_is_relative_to_the_experiment(tmp_path):
    (tmp_path / "exps").mkdir()
    (tmp_path / "exps" / "exp.toml").write_text(DATASET + 'path = "input.txt"\n')
    result = gpt("run", "exps/exp.toml", "--dry-run", cwd=tmp_path)
    assert json.loads(result.stdout)["dataset"]["path"] == str(tmp_path / "exps" / "input.txt")
