"""Metrics callbacks log (``state.log_metrics``), ``on_metrics``, and the ``tokens`` count."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nanogpt_core import Callback, RunPaths, TrainerState, hookimpl
from nanogpt_core.errors import PluginFault
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.checkpoints import load_checkpoint
from nanogpt_core.train.metrics import read_metrics

TOKENS_PER_STEP = 8 * 32  # the tiny experiment: batch 8 x block 32, one process


class FakeEval(Callback):
    """Logs a made-up score after each evaluation and a marker when the run starts."""

    def on_train_start(self, state):
        state.log_metrics({"eval/fake/started_at": state.step})

    def on_eval_end(self, state):
        state.log_metrics({"eval/fake/acc": np.float32(state.step / 100), "eval/fake/none": None})


class Sink(Callback):
    """Keeps every record ``on_metrics`` hands it, with the state's metrics at that moment."""

    def __init__(self, seen):
        self.seen = seen

    def on_metrics(self, state, record):
        with pytest.raises(TypeError):
            record["step"] = 0  # read-only
        self.seen.append((dict(record), dict(state.metrics)))


class Bad(Callback):
    def __init__(self, metrics):
        self.metrics = metrics

    def on_step_end(self, state):
        state.log_metrics(self.metrics)


def plugins_with(seen=None, bad=None):
    class Logging:
        @hookimpl
        def register_callbacks(self, register):
            register("fake_eval", lambda options: FakeEval())
            register("sink", lambda options: Sink(seen))
            register("bad", lambda options: Bad(bad))

    plugins = load_plugins(disabled=())
    plugins.register(Logging(), name="logging")
    return plugins


CALLBACKS = """
[[callbacks]]
plugin = "fake_eval"

[[callbacks]]
plugin = "sink"

[[callbacks]]
plugin = "checkpoint"
"""
SCHEDULE = [
    "train.steps_per_epoch=3",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.log_every=2",
]


def test_logged_metrics_are_lines_of_their_own_in_checkpoints_and_done_and_survive_resume(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    seen = []
    path = tiny_char_experiment(extra=CALLBACKS)
    results = tmp_path / "r"
    train_experiment(
        path, session_data_dir, results, [*SCHEDULE, "train.epochs=2"], plugins_with(seen)
    )
    paths = RunPaths(results / "tiny")
    lines, torn = read_metrics(paths.metrics)
    assert torn == 0
    # on_metrics saw every line, in the file's order.
    assert [record for record, _ in seen] == lines
    logged = [line for line in lines if "train_loss" not in line]
    assert [(line["step"], line["epoch"]) for line in logged] == [(0, 1), (3, 1), (6, 2)]
    assert logged[0] == {
        "step": 0,
        "epoch": 1,
        "tokens": 0,
        "eval/fake/started_at": 0,
        "elapsed_s": logged[0]["elapsed_s"],
    }
    assert logged[2]["eval/fake/acc"] == pytest.approx(0.06) and logged[2]["eval/fake/none"] is None
    assert list(logged[2]) == [
        "step", "epoch", "tokens", "eval/fake/acc", "eval/fake/none", "elapsed_s",
    ]  # fmt: skip
    # Each step's training line comes first: at steps 3 and 6 the evaluation, then what was logged.
    assert [line["step"] for line in lines] == [0, 2, 3, 3, 4, 6, 6]
    # tokens: every line, all processes, every step counted.
    assert all(line["tokens"] == line["step"] * TOKENS_PER_STEP for line in lines)
    # The state's metrics held the logged keys when on_metrics was called...
    assert seen[-1][1]["eval/fake/acc"] == logged[2]["eval/fake/acc"]
    # ...and so do the checkpoint (written after the line) and done.
    checkpoint = load_checkpoint(paths.last_checkpoint)
    assert checkpoint["metrics"]["eval/fake/acc"] == logged[2]["eval/fake/acc"]
    assert checkpoint["metrics"]["tokens"] == 6 * TOKENS_PER_STEP
    done = json.loads(paths.done.read_text())
    assert done["eval/fake/acc"] == logged[2]["eval/fake/acc"]
    assert done["tokens"] == 6 * TOKENS_PER_STEP

    # What a run killed after step 8 leaves: lines past its last checkpoint (step 6), one torn.
    killed = [{**line, "step": step} for line, step in zip(lines[-2:], (7, 8), strict=True)]
    with paths.metrics.open("a") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in killed)
        handle.write('{"step": 9, "trai')
    seen.clear()
    train_experiment(
        path, session_data_dir, results, [*SCHEDULE, "train.epochs=3"], plugins_with(seen)
    )
    resumed, torn = read_metrics(paths.metrics)
    assert torn == 0
    assert resumed[: len(lines)] == lines  # up to the checkpoint, untouched
    new = resumed[len(lines) :]
    assert [record for record, _ in seen] == new
    assert [(line["step"], "train_loss" in line) for line in new] == [
        (6, False),  # on_train_start's marker, at the step resumed from
        (8, True),
        (9, True),
        (9, False),
    ]
    assert new[0]["eval/fake/started_at"] == 6
    assert all(line["tokens"] == line["step"] * TOKENS_PER_STEP for line in new)


def test_a_callback_that_logs_bad_metrics_is_named(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment(extra='\n[[callbacks]]\nplugin = "bad"\n')
    with pytest.raises(PluginFault) as caught:
        train_experiment(
            path,
            session_data_dir,
            tmp_path / "r",
            ["train.steps_per_epoch=1", "train.eval_batches=1"],
            plugins_with(bad={"eval/x": float("nan")}),
        )
    assert str(caught.value) == (
        "callback 'bad' (callbacks[0]) failed in on_step_end: ValueError: "
        "log_metrics: 'eval/x' = nan: expected a finite number or None"
    )
    # The failed step wrote no line of what was logged.
    lines, _ = read_metrics(tmp_path / "r" / "tiny" / "metrics.jsonl")
    assert all("eval/x" not in line for line in lines)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"step": 3}, "'step' is written by the core"),
        ({"tokens": 3}, "'tokens' is written by the core"),
        ({"elapsed_s": 1.0}, "'elapsed_s' is written by the core"),
        ({"eval/x": math.inf}, "'eval/x' = inf: expected a finite number"),
        ({"eval/x": "high"}, "'eval/x' = 'high': expected a number or None, got str"),
        ({"eval/x": True}, "expected a number or None, got bool"),
        ({3: 1.0}, "the name 3 is not a non-empty string"),
        ({"": 1.0}, "the name '' is not a non-empty string"),
        ([("eval/x", 1.0)], "expected a mapping"),
    ],
)
def test_log_metrics_refuses_what_cannot_be_logged(tmp_path, metrics, message):
    state = TrainerState(config=None, paths=RunPaths(tmp_path))
    with pytest.raises(ValueError, match=message):
        state.log_metrics(metrics)
    state.log_metrics({"eval/x": 1, "eval/y": np.float64(0.5), "eval/z": None})
    assert state._requests.metrics == {"eval/x": 1, "eval/y": 0.5, "eval/z": None}
    assert type(state._requests.metrics["eval/y"]) is float
