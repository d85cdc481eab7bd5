"""`gpt batch` and its experiments' processes: signals passed on, no orphans, one folder each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from nanogpt_core.train.checkpoints import load_checkpoint

# One long epoch. The core saves last.pth every 20 steps (the evaluations) and
# when asked to stop: a last.pth of the last logged step (log_every = 1) proves
# that the experiment stopped cleanly.
LONG = {"steps_per_epoch = 40": "steps_per_epoch = 100000", "log_every = 5": "log_every = 1"}
CHECKPOINT = '\n[[callbacks]]\nplugin = "checkpoint"\n'


def long_experiment(write, name: str = "long") -> Path:
    """A tiny experiment that would train for minutes, with the checkpoint callback."""
    path = write(name, CHECKPOINT)
    text = path.read_text()
    for old, new in LONG.items():
        text = text.replace(old, new)
    path.write_text(text)
    return path


def saved_where_it_stopped(results: Path) -> bool:
    """Whether ``last.pth`` holds the last step logged: the save of a clean stop."""
    last = results / "checkpoints" / "last.pth"
    logged = [
        json.loads(line)["step"] for line in (results / "metrics.jsonl").read_text().splitlines()
    ]
    return last.exists() and load_checkpoint(last, resume=True)["step"] == logged[-1]


def start_batch(experiment: Path, data_dir: Path, cwd: Path, **popen: object) -> subprocess.Popen:
    """``gpt batch EXPERIMENT`` in a subprocess, output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "nanogpt_core", "batch", str(experiment), "--data-dir", str(data_dir)],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen,
    )  # fmt: skip


def wait_for_training(batch: subprocess.Popen, results: Path) -> psutil.Process:
    """Wait until the experiment has logged a step; return its process."""
    metrics = results / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert batch.poll() is None and time.monotonic() < deadline, batch.communicate()
        time.sleep(0.05)
    (child,) = psutil.Process(batch.pid).children()
    return child


def processes_running(experiment: Path) -> list[psutil.Process]:
    """Processes whose command line names ``experiment``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(experiment) in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def summary_rows(stdout: str) -> dict[str, list[str]]:
    """The summary table's rows by experiment name."""
    table = stdout[stdout.index("experiment  ") :].splitlines()
    return {line.split()[0]: line.split() for line in table[2:]}


@pytest.mark.slow
def test_sigterm_reaches_the_experiment_which_saves_and_the_batch_stops(
    tiny_char_experiment, session_data_dir, tmp_path
):
    experiment = long_experiment(tiny_char_experiment)
    second = tiny_char_experiment("never_started")
    folder = tmp_path / "exps"
    folder.mkdir()
    listed = [experiment.rename(folder / experiment.name), second.rename(folder / second.name)]
    batch = start_batch(folder, session_data_dir, tmp_path)
    child = wait_for_training(batch, tmp_path / "results" / "long")
    batch.send_signal(signal.SIGTERM)
    out, err = batch.communicate(timeout=60)
    assert batch.returncode == 130, err
    assert not child.is_running()
    rows = summary_rows(out)
    assert rows["long"][1:4] == ["stopped", "(exit", "status"] and rows["long"][4] == "130)"
    assert "never_started" not in rows  # the batch stopped: nothing new started
    assert saved_where_it_stopped(tmp_path / "results" / "long")
    assert "Error: batch stopped by SIGTERM at" in err
    assert not any(processes_running(path) for path in listed)


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_reaches_the_experiment_once(
    tiny_char_experiment, session_data_dir, tmp_path
):
    experiment = long_experiment(tiny_char_experiment)
    # A terminal sends Ctrl-C to its whole foreground process group: give the
    # batch a group of its own and signal the group, as the terminal would.
    batch = start_batch(experiment, session_data_dir, tmp_path, start_new_session=True)
    child = wait_for_training(batch, tmp_path / "results" / "long")
    assert os.getpgid(child.pid) != os.getpgid(batch.pid)
    os.killpg(batch.pid, signal.SIGINT)
    out, err = batch.communicate(timeout=60)
    assert batch.returncode == 130, err
    # One SIGINT asks `gpt run` to save and stop; a second would have aborted it unsaved.
    assert saved_where_it_stopped(tmp_path / "results" / "long")
    assert summary_rows(out)["long"][1] == "stopped"
    assert "Error: batch stopped by SIGINT" in err
    assert not processes_running(experiment)


@pytest.mark.slow
def test_a_killed_batch_leaves_no_experiment_running(
    tiny_char_experiment, session_data_dir, tmp_path
):
    experiment = long_experiment(tiny_char_experiment)
    batch = start_batch(experiment, session_data_dir, tmp_path)
    child = wait_for_training(batch, tmp_path / "results" / "long")
    batch.kill()
    batch.communicate(timeout=60)
    _, alive = psutil.wait_procs([child], timeout=30)
    assert not alive
    assert not processes_running(experiment)


def test_two_experiments_with_one_results_folder_are_refused_before_anything_runs(
    write_toml, tmp_path
):
    body = '[dataset]\nplugin = "shakespeare"\n'
    first = write_toml("x/exp.toml", body)
    second = write_toml("y/exp.toml", body)
    named = write_toml("z/other.toml", 'name = "exp"\n' + body)
    fine = write_toml("z/fine.toml", body)
    result = subprocess.run(
        [sys.executable, "-m", "nanogpt_core", "batch", str(fine), str(first), str(second),
         str(named), "--results-dir", str(tmp_path / "results")],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"Error: {first} and {second} both write results/exp/; "
        'give one of them another `name = "..."`',
        f"Error: {first} and {named} both write results/exp/; "
        'give one of them another `name = "..."`',
    ]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists() and "==" not in result.stdout
