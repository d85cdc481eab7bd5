"""One writer per results folder, and a results folder holds one experiment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanogpt_core.locks import LockHeld, locked

CHECKPOINT = '[[callbacks]]\nplugin = "checkpoint"\n'
SHORT = ["train.steps_per_epoch=4", "train.eval_every=4", "train.eval_batches=1"]


def sets(overrides) -> list[str]:
    return [part for o in overrides for part in ("--set", o)]


def gpt_popen(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def gpt(*args, cwd: Path) -> subprocess.CompletedProcess:
    proc = gpt_popen(*args, cwd=cwd)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_second_run_of_the_same_experiment_is_refused_naming_the_holder(
    tiny_char_experiment, session_data_dir, tmp_path
):
    path = tiny_char_experiment(extra=CHECKPOINT)
    args = ["run", str(path), "--data-dir", str(session_data_dir)]
    first = gpt_popen(
        *args, *sets(["train.steps_per_epoch=100000", "train.log_every=1"]), cwd=tmp_path
    )
    try:
        wait_for(tmp_path / "results" / "tiny" / "metrics.jsonl", first)
        second = gpt(*args, *sets(["train.steps_per_epoch=100000"]), cwd=tmp_path)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"Error: results folder results/tiny is in use by pid {first.pid} "
            "(lock results/.tiny.lock); wait for it to finish or stop it"
        ]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The killed holder's lock is free at once: the next run takes it over and resumes.
    third = gpt(*args, *sets(SHORT), cwd=tmp_path)
    assert third.returncode == 0, third.stderr


def test_the_lock_is_taken_over_from_a_dead_holder_and_refused_while_held(tmp_path):
    lock = tmp_path / ".x.lock"
    lock.write_text("999999\n")  # a pid file alone would claim this forever
    with locked(lock, wait=False, purpose="x"):
        assert lock.read_text() == f"{os.getpid()}\n"
        holder = subprocess.run(
            [sys.executable, "-c",
             f"from nanogpt_core.locks import locked\nwith locked({str(lock)!r}, wait=False, purpose='x'): pass"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert holder.returncode == 1 and "LockHeld" in holder.stderr
        assert f"in use by pid {os.getpid()}" in holder.stderr
    assert lock.read_text() == ""
    with (
        pytest.raises(LockHeld),
        locked(lock, wait=False, purpose="x"),
        locked(lock, wait=False, purpose="x"),
    ):
        pass


def test_fresh_moves_old_results_only_after_the_experiment_is_checked(
    tiny_char_experiment, session_data_dir, tmp_path
):
    path = tiny_char_experiment(extra=CHECKPOINT)
    args = ["run", str(path), "--data-dir", str(session_data_dir)]
    assert gpt(*args, *sets(SHORT), cwd=tmp_path).returncode == 0
    bad = gpt(*args, "--fresh", *sets([*SHORT, "model.block_size=2000000"]), cwd=tmp_path)
    assert bad.returncode == 2
    assert "model.block_size = 2000000: the val split of" in bad.stderr
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [".tiny.lock", "tiny"]
    assert (tmp_path / "results" / "tiny" / "checkpoints" / "last.pth").exists()


def test_a_folder_holding_another_experiment_is_refused_with_what_differs(
    tiny_char_experiment, session_data_dir, tmp_path
):
    path = tiny_char_experiment(extra=CHECKPOINT)
    args = ["run", str(path), "--data-dir", str(session_data_dir)]
    assert gpt(*args, *sets(SHORT), cwd=tmp_path).returncode == 0
    other = gpt(*args, *sets([*SHORT, "train.weight_decay=0.5", "seed=7"]), cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        "Error: results/tiny holds a run of a different experiment (seed: 1337 there, 7 now; "
        "train.weight_decay: 0.1 there, 0.5 now); use --fresh to move it aside and start "
        "over, or set another name"
    ]
    # A longer schedule is the same experiment: it resumes.
    longer = gpt(*args, *sets([*SHORT, "train.epochs=2"]), cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr
    assert "resuming from step 4" in longer.stdout


def test_a_model_too_big_for_memory_is_refused_with_the_estimate(
    tiny_char_experiment, session_data_dir, tmp_path
):
    path = tiny_char_experiment()
    big = ["model.n_layer=4000", "model.n_embd=4096", "model.n_head=32"]
    result = gpt("run", str(path), "--data-dir", str(session_data_dir), *sets(big), cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: model: 805,")  # 4000 * 12 * 4096^2 + embeddings
    assert "for weights, gradients and optimizer state" in line
    assert "--set train.memory_check=false" in line
    assert not (tmp_path / "results" / "tiny").exists()


def test_a_config_json_from_before_an_option_existed_still_matches(write_toml, installed_plugins):
    from nanogpt_core.config.experiment_file import load_experiment
    from nanogpt_core.train.resume import config_differences

    path = write_toml("x.toml", '[dataset]\nplugin = "shakespeare"\n')
    current = load_experiment(path, (), installed_plugins).to_dict()
    # What an earlier version wrote: no optimizer, schedule or architecture options.
    older = json.loads(json.dumps(current))
    for key in ("optimizer", "schedule"):
        del older["train"][key]
    for key in (
        "position",
        "rope_theta",
        "norm",
        "mlp",
        "qk_norm",
        "tie_embeddings",
        "logit_softcap",
    ):
        del older["model"][key]
    assert config_differences(older, current) == []
    # A new option set away from its default is a different experiment.
    rope = load_experiment(path, ("model.position=rope",), installed_plugins).to_dict()
    assert config_differences(older, rope) == ['model.position: "(absent)" there, "rope" now']
