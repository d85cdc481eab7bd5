"""Faults lose nothing: kills at random moments, a full disk, Ctrl-C during start-up."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from nanogpt_core.train.checkpoints import load_checkpoint
from nanogpt_core.train.metrics import read_metrics

TEMP_MARK = ".tmp-"


def sets(overrides) -> list[str]:
    return [part for o in overrides for part in ("--set", o)]


def start(args, cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **kwargs,
    )


def losses(path: Path) -> list[tuple]:
    records, torn = read_metrics(path)
    assert torn == 0
    return [(r["step"], r["train_loss"], r.get("val_loss"), r["lr"]) for r in records]


def temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob(f"*{TEMP_MARK}*")]


def kill_inside_a_checkpoint_write(proc: subprocess.Popen, folder: Path, limit: float) -> bool:
    """SIGKILL the run as soon as a checkpoint temporary appears; False if none did in time."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if any(TEMP_MARK in name for name in os.listdir(folder)):
                proc.send_signal(signal.SIGKILL)
                return True
        except FileNotFoundError:
            pass
    return False


FAULT_RUN = [
    "model.n_embd=128",
    "model.block_size=64",
    "train.batch_size=8",
    "train.epochs=4",
    "train.steps_per_epoch=100",
    "train.eval_every=50",
    "train.eval_batches=2",
    "train.log_every=1",
]
CALLBACKS = (
    '[[callbacks]]\nplugin = "checkpoint"\nevery_steps = 3\n[[callbacks]]\nplugin = "tensorboard"\n'
)


@pytest.mark.slow
def test_twenty_random_kills_lose_nothing(tiny_char_experiment, tmp_path):
    path = tiny_char_experiment(extra=CALLBACKS)
    straight = start(
        [
            "run",
            str(path),
            "--data-dir",
            "data-straight",
            "--results-dir",
            "straight",
            *sets(FAULT_RUN),
        ],
        tmp_path,
    )
    assert straight.wait(timeout=600) == 0, straight.communicate()[1]

    rng = random.Random(20261130)
    args = ["run", str(path), "--data-dir", "data", "--results-dir", "killed", *sets(FAULT_RUN)]
    checkpoints = tmp_path / "killed" / "tiny" / "checkpoints"
    kills = inside_writes = 0
    while kills < 20:
        proc = start(args, tmp_path)
        if kills % 2:
            inside = kill_inside_a_checkpoint_write(proc, checkpoints, limit=20)
            inside_writes += inside
        else:
            time.sleep(rng.uniform(0.2, 3.0))  # start-up, data preparation or training
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=120)
        assert code in (0, -signal.SIGKILL), proc.communicate()[1]
        if code == 0:
            break  # finished before the kill: nothing left to interrupt
        kills += 1
    assert kills == 20, "the run finished before 20 kills: make it longer"
    assert inside_writes >= 5, "too few kills landed inside checkpoint writes"
    final = start(args, tmp_path)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err
    assert losses(tmp_path / "killed" / "tiny" / "metrics.jsonl") == losses(
        tmp_path / "straight" / "tiny" / "metrics.jsonl"
    )
    assert json.loads((tmp_path / "killed" / "tiny" / "done").read_text())["step"] == 400
    assert temporaries(tmp_path / "killed", tmp_path / "data") == []
    leftovers = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if str(path) in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []
    assert load_checkpoint(checkpoints / "last.pth", resume=True)["step"] == 400


def limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(
    tiny_char_experiment, session_data_dir, tmp_path
):
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "checkpoint"\n')
    short = [
        "train.steps_per_epoch=4",
        "train.eval_every=4",
        "train.eval_batches=1",
        "train.log_every=1",
    ]
    args = ["run", str(path), "--data-dir", str(session_data_dir), *sets(short)]
    first = start(args, tmp_path)
    assert first.wait(timeout=300) == 0, first.communicate()[1]
    last = tmp_path / "results" / "tiny" / "checkpoints" / "last.pth"
    # Checkpoints of this model are ~0.4 MB: a 100 kB file-size limit fails their write.
    full = start([*args, "--set", "train.epochs=2"], tmp_path, preexec_fn=limit_file_size(100_000))
    _, err = full.communicate(timeout=300)
    assert full.returncode == 2, err
    assert err.strip().splitlines()[-1] == (
        "Error: results/tiny/checkpoints/ckpt_epoch_2.pth: cannot write: the file is larger than "
        "this system allows (file-size limit); free space or choose another folder"
    )
    assert load_checkpoint(last, resume=True)["step"] == 4
    assert temporaries(tmp_path / "results") == []
    steps = [s for s, *_ in losses(tmp_path / "results" / "tiny" / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # metrics stay parseable; the resumed run redoes 5-8
    again = start([*args, "--set", "train.epochs=2"], tmp_path)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "resuming from step 4" in out
    assert [s for s, *_ in losses(tmp_path / "results" / "tiny" / "metrics.jsonl")] == list(
        range(1, 9)
    )


def test_a_read_only_results_folder_is_one_line(tiny_char_experiment, session_data_dir, tmp_path):
    from nanogpt_core.errors import StorageError
    from nanogpt_core.files import atomic_write_text, storage_error

    error = storage_error(tmp_path / "x", OSError(30, "Read-only file system"))
    assert isinstance(error, StorageError)
    assert (
        str(error)
        == f"{tmp_path / 'x'}: cannot write: the file system is read-only; free space or choose another folder"
    )
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the errno mapping is checked above")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    with pytest.raises(StorageError, match="permission denied"):
        atomic_write_text(folder / "f.txt", "x")


def test_ctrl_c_during_preparation_exits_130(shared_data, tmp_path, write_toml):
    # The complete plays in GPT-2 BPE take seconds to prepare: long enough to interrupt.
    text = '[dataset]\nplugin = "shakespeare"\nsource = "complete"\ntokenizer = "gpt2"\n'
    exp = write_toml("plays.toml", text)
    proc = start(["prepare", str(exp), "--data-dir", "data"], tmp_path)
    deadline = time.monotonic() + 120
    while not temporaries(tmp_path / "data"):  # the token files are being written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "Interrupted."
    assert "Traceback" not in err
    assert not list((tmp_path / "data").rglob("meta.json"))
    assert temporaries(tmp_path / "data") == []


def test_a_full_disk_while_preparing_is_one_line_and_the_old_data_stays(shared_data, tmp_path):
    from nanogpt_core.data.prepared import open_prepared

    text = shared_data / "tinyshakespeare" / "input.txt"
    exp = tmp_path / "exp.toml"
    exp.write_text(f'[dataset]\nplugin = "shakespeare"\npath = "{text}"\n')
    first = start(["prepare", str(exp), "--data-dir", "data"], tmp_path)
    assert first.wait(timeout=300) == 0, first.communicate()[1]
    folder = tmp_path / "data" / "shakespeare" / "tiny-char"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    # train.bin is 2 MB of uint16 tokens: a 1 MB file-size limit stops its rewrite.
    again = start(
        ["prepare", str(exp), "--data-dir", "data", "--force"],
        tmp_path,
        preexec_fn=limit_file_size(1_000_000),
    )
    _, err = again.communicate(timeout=300)
    assert again.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0] == (
        "Error: data/shakespeare/tiny-char: cannot write: the file is larger than this system "
        "allows (file-size limit); free space or choose another folder"
    )
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert open_prepared(folder) is not None
