"""Bad input a new user tries, each one line and exit 2, no traceback (issue 20's core faults).

Every case runs the CLI in a subprocess, as a user would, against a small
checkpoint written by an older nanogpt (``tests/fixtures``).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIXTURE_CKPT = (
    Path(__file__).resolve().parents[1] / "fixtures" / "0.1.0-gpt2" / "results" / "checkpoints"
) / "last.pth"


def gpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, with a deadline: a hang is a failure, not a stuck suite."""
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one ``Error:`` line a refusal ends with; fails on a traceback or a zero exit."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e-300", "-1", "1e9"])
def test_sample_refuses_a_temperature_out_of_range(value, tmp_path):
    line = error_line(gpt("sample", "--ckpt", FIXTURE_CKPT, "--temperature", value, cwd=tmp_path))
    assert line.startswith("Error: Invalid value for '--temperature': ")
    assert line.endswith("is not a temperature: use 0 (greedy) or 0.0001 to 10000")


def test_the_edges_of_the_temperature_range_sample(tmp_path):
    for value in ("0", "0.0001", "10000"):
        done = gpt("sample", "--ckpt", FIXTURE_CKPT, "--temperature", value,
                   "--max-new-tokens", "5", cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--seed", str(2**64), f"{2**64} is not a seed: use 0 to {2**64 - 1} (2**64 - 1)"),
        ("--seed", "-1", f"-1 is not a seed: use 0 to {2**64 - 1} (2**64 - 1)"),
        ("--top-p", "nan", "nan is not a probability for top-p: use a number above 0 and at most 1"),
        ("--top-p", "0", "0 is not a probability for top-p: use a number above 0 and at most 1"),
    ],
)  # fmt: skip
def test_chat_refuses_a_seed_or_top_p_out_of_range(option, value, message, tmp_path):
    done = gpt("chat", "--ckpt", FIXTURE_CKPT, option, value, "--once", "hi", cwd=tmp_path)
    assert error_line(done) == f"Error: Invalid value for '{option}': {message}"


def test_serve_refuses_a_grace_that_is_not_finite(tmp_path):
    done = gpt("serve", "--ckpt", FIXTURE_CKPT, "--grace", "nan", cwd=tmp_path)
    assert error_line(done) == "Error: Invalid value for '--grace': nan is not a finite number"


def test_serve_requests_use_the_same_ranges():
    pytest.importorskip("pydantic")
    from pydantic import ValidationError

    from nanogpt_core.generate.serve_api import SamplingBody

    for field, value in (("temperature", 1e-300), ("top_p", float("nan")), ("seed", 2**64)):
        with pytest.raises(ValidationError) as caught:
            SamplingBody(**{field: value})
        (error,) = caught.value.errors()
        assert error["loc"] == (field,)
        if field != "top_p":  # pydantic's own le=1 refuses a NaN top_p first
            assert "is not a" in error["msg"], error
    assert SamplingBody(temperature=0.7, top_p=0.9, seed=2**64 - 1).seed == 2**64 - 1


def test_a_checkpoint_with_nan_weights_is_one_line(tmp_path):
    from nanogpt_core.train.checkpoints import save_checkpoint

    checkpoint = torch.load(FIXTURE_CKPT, weights_only=True)
    checkpoint.pop("checksum")
    checkpoint["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    diverged = tmp_path / "diverged.pth"
    save_checkpoint(diverged, checkpoint)  # a valid checksum over NaN weights
    for command in (["sample"], ["export", "--out", tmp_path / "hf"]):
        done = gpt(*command, "--ckpt", diverged, cwd=tmp_path)
        assert error_line(done) == (
            f"Error: {diverged}: the weights are not finite (NaN or infinity in "
            "transformer.h.0.mlp.c_fc.weight): the run diverged before it was saved; "
            "use an earlier checkpoint"
        )
    assert not (tmp_path / "hf").exists()


def test_a_fifo_or_a_device_as_ckpt_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        done = gpt("sample", "--ckpt", path, cwd=tmp_path)  # a read would hang or never end
        assert error_line(done) == (
            f"Error: {path}: not a regular file, expected a .pth checkpoint file"
        )


def test_a_folder_option_below_a_file_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    experiment = tmp_path / "e.toml"
    experiment.write_text('[dataset]\nplugin = "shakespeare"\nsource = "complete"\n')
    cases = [
        ("run", experiment, "--data-dir", "notes.txt/data"),
        ("prepare", experiment, "--data-dir", "notes.txt/data"),
        ("run", experiment, "--results-dir", "notes.txt/results"),
        ("export", "--ckpt", FIXTURE_CKPT, "--out", "notes.txt/hf"),
    ]
    for args in cases:
        option = args[-2]
        assert error_line(gpt(*args, cwd=tmp_path)) == (
            f"Error: Invalid value for '{option}': notes.txt is a file, not a folder; "
            "choose a folder path"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.toml", "notes.txt"]


def test_a_full_disk_when_taking_a_lock_is_the_usual_line(tmp_path, monkeypatch):
    from nanogpt_core import locks
    from nanogpt_core.errors import StorageError

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(locks.os, "write", full)
    lock = tmp_path / "run" / ".lock"
    with pytest.raises(StorageError) as caught, locks.locked(lock, wait=False, purpose="x"):
        pass
    assert str(caught.value) == (
        f"{lock}: cannot write: the disk is full; free space or choose another folder"
    )


def prepare_tiny(shared_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Tiny Shakespeare prepared in ``tmp_path/data``: the experiment and the data folder."""
    experiment = tmp_path / "tiny.toml"
    text = shared_data / "tinyshakespeare" / "input.txt"
    experiment.write_text(f'[dataset]\nplugin = "shakespeare"\npath = "{text}"\n')
    done = gpt("prepare", experiment, "--data-dir", "data", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return experiment, tmp_path / "data" / "shakespeare" / "tiny-char"


@pytest.mark.parametrize("edit", ["vocab_size", "chars"])
def test_a_hand_edited_meta_json_is_refused_until_prepared_again(edit, shared_data, tmp_path):
    import json

    experiment, folder = prepare_tiny(shared_data, tmp_path)
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    if edit == "vocab_size":
        meta["tokenizer"]["vocab_size"] = 1000
    else:
        meta["tokenizer"]["chars"] = meta["tokenizer"]["chars"][:5]
    meta_path.write_text(json.dumps(meta))
    for command in ("prepare", "run"):
        done = gpt(command, experiment, "--data-dir", "data", cwd=tmp_path)
        assert error_line(done) == (
            f"Error: {Path('data/shakespeare/tiny-char/meta.json')}: checksum: the file was "
            "edited or damaged since it was written; prepare again with `gpt prepare "
            "EXPERIMENT --force` or delete data/shakespeare/tiny-char"
        )
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.pth"))
    again = gpt("prepare", experiment, "--data-dir", "data", "--force", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(meta_path.read_text())["tokenizer"]["vocab_size"] == 65


def test_an_up_to_date_prepare_removes_what_a_killed_writer_left(shared_data, tmp_path):
    experiment, folder = prepare_tiny(shared_data, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names the temporaries of a writer that is gone
    left = [folder / f".train.bin.tmp-{dead.pid}", folder / f".val.bin.tmp-{dead.pid}"]
    for path in left:
        path.write_bytes(b"\0" * 1000)
    alive = folder / f".train.bin.tmp-{os.getpid()}"  # a live writer's file stays
    alive.write_bytes(b"\0")
    done = gpt("prepare", experiment, "--data-dir", "data", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [path.exists() for path in left] == [False, False]
    assert alive.exists()
