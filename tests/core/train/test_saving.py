"""The core saves last.pth on its own: save_every, epoch ends, stops, kills; a warning at the start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanogpt_core import Callback, hookimpl
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.checkpointing import unresumable_warning
from nanogpt_core.train.checkpoints import load_checkpoint

# Two epochs of four steps, evaluating every third step.
TWO_EPOCHS = [
    "train.epochs=2",
    "train.steps_per_epoch=4",
    "train.eval_every=3",
    "train.eval_batches=1",
]


class Saves(Callback):
    """Records every checkpoint written; ``greedy`` also asks for last.pth at every hook."""

    def __init__(self, written: list, greedy: bool) -> None:
        self.written = written
        self.greedy = greedy

    def _ask(self, state) -> None:
        if self.greedy:
            state.request_save("last.pth")

    def on_train_start(self, state):
        self._ask(state)

    def on_step_end(self, state):
        self._ask(state)

    def on_eval_end(self, state):
        self._ask(state)

    def on_epoch_end(self, state):
        self._ask(state)

    def on_train_end(self, state):
        self._ask(state)

    def on_checkpoint(self, state, path):
        self.written.append((path.name, state.step))


def saves_plugins(written: list):
    class Recording:
        @hookimpl
        def register_callbacks(self, register):
            register("saves", lambda options: Saves(written, greedy=False))
            register("greedy", lambda options: Saves(written, greedy=True))

    plugins = load_plugins(disabled=())
    plugins.register(Recording(), name="recording")
    return plugins


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "must be 0 or more, got -1"),
        ('"often"', 'expected an integer, got "often"'),
        ("2.5", "expected an integer, got 2.5"),
    ],
)
def test_a_bad_save_every_is_one_line_and_exit_2(tmp_path, value, message):
    (tmp_path / "exp.toml").write_text(
        f'[dataset]\nplugin = "shakespeare"\n[train]\nsave_every = {value}\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "nanogpt_core", "run", "exp.toml", "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"Error: exp.toml: train.save_every: {message}"]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("save_every", "steps"),
    [
        (None, [3, 4, 6, 8]),  # unset: at every evaluation, and at epoch ends
        (5, [4, 5, 8]),  # every 5 steps instead of every evaluation
        (0, [4, 8]),  # epoch ends only (the last one is the end)
    ],
)
def test_without_the_checkpoint_plugin_the_core_writes_last_pth(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment, save_every, steps
):
    written = []
    overrides = TWO_EPOCHS + ([] if save_every is None else [f"train.save_every={save_every}"])
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "saves"\n')
    train_experiment(path, session_data_dir, tmp_path / "r", overrides, saves_plugins(written))
    assert written == [("last.pth", step) for step in steps]
    folder = tmp_path / "r" / "tiny" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["last.pth"]
    assert load_checkpoint(folder / "last.pth", resume=True)["step"] == 8


def test_last_pth_is_written_once_per_step_however_often_it_is_asked_for(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    # The core (at steps 3, 4, 6, 8 and the end), the checkpoint plugin (every step, epoch
    # ends, the end) and a callback asking at every hook all want last.pth.
    written = []
    extra = (
        '[[callbacks]]\nplugin = "greedy"\n[[callbacks]]\nplugin = "checkpoint"\nevery_steps = 1\n'
    )
    path = tiny_char_experiment(extra=extra)
    train_experiment(path, session_data_dir, tmp_path / "r", TWO_EPOCHS, saves_plugins(written))
    # Step 0 too: the greedy callback asked in on_train_start, before anything was saved.
    assert [step for name, step in written if name == "last.pth"] == list(range(0, 9))
    assert [entry for entry in written if entry[0] != "last.pth"] == [
        ("ckpt_epoch_1.pth", 4),
        ("ckpt_epoch_2.pth", 8),
    ]


def test_a_run_that_cannot_resume_after_a_kill_says_so_in_one_line_before_training(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment, capfd
):
    path = tiny_char_experiment()  # one epoch of 40 steps, evaluating every 20
    train_experiment(path, session_data_dir, tmp_path / "r", ["train.save_every=0"])
    out = capfd.readouterr().out.splitlines()
    warnings = [line for line in out if line.startswith("warning:")]
    assert warnings == [
        "warning: the core first saves last.pth at the last step (40), so a run killed before "
        "then (kill -9, a crash) cannot resume; set train.save_every below 40 to save sooner "
        "(now 0)"
    ]
    first_evaluation = next(i for i, line in enumerate(out) if line.startswith("step 20/40 "))
    assert out.index(warnings[0]) < first_evaluation  # said before training
    last = tmp_path / "r" / "tiny" / "checkpoints" / "last.pth"
    assert load_checkpoint(last, resume=True)["step"] == 40  # saved at the end, as it said


def warning_for(write_toml, sets: list[str], callbacks: str = "") -> str | None:
    path = write_toml(
        "exp.toml",
        '[dataset]\nplugin = "shakespeare"\n[train]\nsteps_per_epoch = 40\neval_every = 20\n'
        + callbacks,
    )
    config = load_experiment(path, sets, load_plugins(disabled=()))
    return unresumable_warning(
        config, config.train.steps_per_epoch, config.train.epochs * config.train.steps_per_epoch
    )


CHECKPOINT_EVERY_10 = '[[callbacks]]\nplugin = "checkpoint"\nevery_steps = 10\n'


@pytest.mark.parametrize(
    ("sets", "callbacks", "warns"),
    [
        ([], "", None),  # saves at step 20, the evaluation
        (["train.save_every=39"], "", None),
        (["train.save_every=40"], "", "(now 40)"),
        (["train.save_every=0"], "", "(now 0)"),
        (["train.save_every=0", "train.epochs=2"], "", None),  # the first epoch's end saves
        (["train.eval_every=40"], "", "(now unset, so it follows train.eval_every = 40)"),
        (["train.eval_every=1000", "train.save_every=10"], "", None),
        (["train.save_every=0", "train.steps_per_epoch=1"], "", None),  # nothing to resume
        # The checkpoint plugin's every_steps is part of the experiment too.
        (["train.save_every=0"], CHECKPOINT_EVERY_10, None),
        (["train.save_every=0"], '[[callbacks]]\nplugin = "checkpoint"\n', "(now 0)"),
    ],
)
def test_the_start_of_run_warning_follows_the_config(write_toml, sets, callbacks, warns):
    warning = warning_for(write_toml, sets, callbacks)
    if warns is None:
        assert warning is None
    else:
        assert warning.startswith("warning: the core first saves last.pth at the last step")
        assert warning.endswith(warns)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def logged(metrics: Path) -> list[tuple]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["train_loss"], r.get("val_loss"), r["lr"]) for r in records]


@pytest.mark.slow
def test_a_run_without_the_checkpoint_plugin_resumes_after_kill_9(
    tiny_char_experiment, session_data_dir, tmp_path
):
    path = tiny_char_experiment()  # no [[callbacks]] at all; evaluates every 20 steps
    sets = [
        "train.steps_per_epoch=60",
        "train.log_every=1",
        "model.n_embd=64",
        "train.batch_size=16",
    ]
    command = [sys.executable, "-m", "nanogpt_core", "run", str(path), "--data-dir",
               str(session_data_dir), *[part for s in sets for part in ("--set", s)]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(results: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*command, "--results-dir", results], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    straight = start("straight")
    assert straight.wait(timeout=600) == 0, straight.communicate()[1]
    killed = start("killed")
    last = tmp_path / "killed" / "tiny" / "checkpoints" / "last.pth"
    wait_for(last, killed)  # the core's first save: step 20's evaluation
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    saved = load_checkpoint(last, resume=True)["step"]
    assert saved in (20, 40)
    resumed = start("killed")  # the same command
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resuming from step {saved} (epoch 1)" in out
    metrics = tmp_path / "killed" / "tiny" / "metrics.jsonl"
    assert logged(metrics) == logged(tmp_path / "straight" / "tiny" / "metrics.jsonl")
    assert [step for step, *_ in logged(metrics)] == list(range(1, 61))
    assert load_checkpoint(last, resume=True)["step"] == 60
    done = json.loads((tmp_path / "killed" / "tiny" / "done").read_text())
    assert done["step"] == 60
    assert [p.name for p in last.parent.iterdir()] == ["last.pth"]  # no temporaries left
