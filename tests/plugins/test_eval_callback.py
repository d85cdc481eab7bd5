"""The eval callback: scores logged during training, equal to the trainer's, at no cost to it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nanogpt_core.train.metrics import read_metrics

EVAL = """
[[callbacks]]
plugin = "eval"
tasks = ["val_loss"]
every_steps = 15
"""


def gpt_run(experiment, results, data, *overrides) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "nanogpt_core", "run", str(experiment)]
    command += ["--results-dir", str(results), "--data-dir", str(data)]
    for assignment in overrides:
        command += ["--set", assignment]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_scores_are_logged_at_their_steps_and_training_is_unchanged(
    tiny_char_experiment, session_data_dir, tmp_path
):
    plain = tiny_char_experiment(name="plain")
    scored = tiny_char_experiment(name="scored", extra=EVAL + '[eval.val_loss]\nsplits = ["val"]\n')
    for experiment in (plain, scored):
        done = gpt_run(experiment, tmp_path, session_data_dir)
        assert done.returncode == 0, done.stderr[-2000:]
    without, _ = read_metrics(tmp_path / "plain" / "metrics.jsonl")
    with_eval, _ = read_metrics(tmp_path / "scored" / "metrics.jsonl")
    logged = [r for r in with_eval if "eval/val_loss/val_loss" in r]
    # every_steps = 15 of 40, and once after the last step.
    assert [r["step"] for r in logged] == [15, 30, 40]
    assert all(
        set(r) == {"step", "epoch", "tokens", "eval/val_loss/val_loss", "elapsed_s"} for r in logged
    )
    # Scoring uses no random numbers: the training lines are those of the run without it.
    training = [r for r in with_eval if "train_loss" in r]
    assert [(r["step"], r["train_loss"]) for r in training] == [
        (r["step"], r["train_loss"]) for r in without
    ]
    # The same fixed batches as the trainer's own evaluation at step 40: the same number.
    last = [r for r in training if "val_loss" in r][-1]
    assert last["step"] == 40 and logged[-1]["eval/val_loss/val_loss"] == last["val_loss"]
    done = (tmp_path / "scored" / "done").read_text()
    assert "eval/val_loss/val_loss" in done


def test_unknown_tasks_fail_before_anything_is_prepared(tiny_char_experiment, tmp_path):
    experiment = tiny_char_experiment(name="typo", extra=EVAL.replace("val_loss", "val_los"))
    done = gpt_run(experiment, tmp_path / "results", tmp_path / "data")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "Error: callbacks.eval.tasks: no eval task named 'val_los' (did you mean \"val_loss\"?); "
        "installed: hellaswag, val_loss"
    ]
    # Only the run lock (beside the folder) was made: no data, no results folder.
    assert not (tmp_path / "data").exists() and not (tmp_path / "results" / "typo").exists()
