"""The checkpoint callback: what it saves, atomic writes, exact resume, refusals."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanogpt_core.errors import NanoGPTError
from nanogpt_core.train.checkpoints import CheckpointError, load_checkpoint, save_checkpoint

ALL_CALLBACKS = """
[[callbacks]]
plugin = "checkpoint"
every_steps = {every}

[[callbacks]]
plugin = "fixed_prompts"
prompts = ["ROMEO:", "To be"]
max_new_tokens = 16

[[callbacks]]
plugin = "tensorboard"
"""


def losses(metrics_path: Path) -> list[tuple]:
    """Every logged loss, with its step: what exact resume must reproduce."""
    out = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        out.append((record["step"], record["train_loss"], record.get("val_loss"), record["lr"]))
    return out


SHORT = [
    "train.epochs=2",
    "train.steps_per_epoch=6",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.log_every=1",
]


def test_saves_last_and_epoch_checkpoints_with_everything_needed(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment(extra=ALL_CALLBACKS.format(every=4))
    train_experiment(path, session_data_dir, tmp_path / "r", SHORT)
    folder = tmp_path / "r" / "tiny" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "ckpt_epoch_1.pth",
        "ckpt_epoch_2.pth",
        "last.pth",
    ]
    last = torch.load(folder / "last.pth", weights_only=True)
    assert last["step"] == 12 and last["epoch"] == 2
    assert {
        "model",
        "optimizer",
        "ranks",
        "callbacks",
        "config",
        "tokenizer",
        "version",
        "model_args",
        "metrics",
        "data",
        "checksum",
    } <= set(last)
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in last["model"])
    assert all(v.dtype == torch.float32 for v in last["model"].values())
    assert set(last["ranks"][0]) == {"sampler", "rng"}
    assert set(last["ranks"][0]["rng"]) >= {"python", "numpy", "torch"}
    assert last["tokenizer"]["kind"] == "char" and len(last["tokenizer"]["chars"]) == 65
    assert [(c["position"], c["plugin"]) for c in last["callbacks"]] == [
        (0, "checkpoint"),
        (1, "fixed_prompts"),
        (2, "tensorboard"),
    ]
    assert last["data"]["plugin"] == "shakespeare" and last["data"]["fingerprint"]
    assert load_checkpoint(folder / "last.pth", resume=True)["checksum"]
    assert last["config"]["name"] == "tiny"
    first_epoch = torch.load(folder / "ckpt_epoch_1.pth", weights_only=True)
    assert first_epoch["step"] == 6


def test_keep_last_prunes_old_epoch_checkpoints(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "checkpoint"\nkeep_last = 2\n')
    train_experiment(
        path,
        session_data_dir,
        tmp_path / "r",
        ["train.epochs=4", "train.steps_per_epoch=2", "train.eval_batches=1"],
    )
    folder = tmp_path / "r" / "tiny" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "ckpt_epoch_3.pth",
        "ckpt_epoch_4.pth",
        "last.pth",
    ]


def test_a_run_continues_from_last_pth(
    tiny_char_experiment, session_data_dir, tmp_path, capfd, train_experiment
):
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "checkpoint"\n')
    train_experiment(path, session_data_dir, tmp_path / "r", ["train.epochs=1", *SHORT[1:]])
    train_experiment(path, session_data_dir, tmp_path / "r", SHORT)
    assert "resuming from step 6 (epoch 1)" in capfd.readouterr().out
    steps = [s for s, *_ in losses(tmp_path / "r" / "tiny" / "metrics.jsonl")]
    assert steps == list(range(1, 13))


def test_resumed_losses_equal_an_uninterrupted_run_in_process(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment(extra=ALL_CALLBACKS.format(every=3))
    train_experiment(path, session_data_dir, tmp_path / "straight", SHORT)
    train_experiment(path, session_data_dir, tmp_path / "resumed", ["train.epochs=1", *SHORT[1:]])
    train_experiment(path, session_data_dir, tmp_path / "resumed", SHORT)
    assert losses(tmp_path / "resumed" / "tiny" / "metrics.jsonl") == losses(
        tmp_path / "straight" / "tiny" / "metrics.jsonl"
    )


MODEL_ARGS = {
    "block_size": 8,
    "vocab_size": 64,
    "n_layer": 1,
    "n_head": 1,
    "n_embd": 8,
    "dropout": 0.0,
    "bias": False,
}
TOKENIZER = {"kind": "char", "vocab_size": 2, "chars": "ab"}


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    good = {
        "model": {"w": torch.ones(3)},
        "model_args": MODEL_ARGS,
        "step": 1,
        "tokenizer": TOKENIZER,
    }
    save_checkpoint(path, good)

    def explode(obj, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {**good, "step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refuses_truncated_corrupt_foreign_and_unsafe_files(tmp_path):
    good = tmp_path / "good.pth"
    save_checkpoint(
        good,
        {
            "model": {"w": torch.ones(1000)},
            "model_args": MODEL_ARGS,
            "step": 1,
            "tokenizer": TOKENIZER,
        },
    )
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.ones(2)}, foreign)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": Exploit(), "model_args": {}, "step": 1, "tokenizer": {}}, unsafe)

    cases = {
        truncated: "not a readable checkpoint (truncated or corrupt",
        garbage: "not a readable checkpoint (truncated or corrupt",
        foreign: "not a usable nanogpt checkpoint: missing model, model_args, step, tokenizer",
        unsafe: "refused: loading it would run pickled code",
        tmp_path / "missing.pth": "file not found",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert message in str(info.value) and "\n" not in str(info.value), path
    assert pickle  # the exploit class pickles through the standard pickler


def test_refuses_a_checkpoint_of_another_model_shape(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "checkpoint"\n')
    train_experiment(
        path, session_data_dir, tmp_path / "r", ["train.steps_per_epoch=2", "train.eval_batches=1"]
    )
    with pytest.raises(
        NanoGPTError,
        match=r"r/tiny holds a run of a different experiment \(model.n_embd: 32 there, 64 now\)",
    ):
        train_experiment(
            path,
            session_data_dir,
            tmp_path / "r",
            ["train.steps_per_epoch=4", "train.eval_batches=1", "model.n_embd=64"],
        )
    # Without config.json to compare, the checkpoint itself says what differs.
    (tmp_path / "r" / "tiny" / "config.json").unlink()
    with pytest.raises(NanoGPTError, match=r"model\.n_embd = 64 now, 32 in the checkpoint"):
        train_experiment(
            path,
            session_data_dir,
            tmp_path / "r",
            ["train.steps_per_epoch=4", "train.eval_batches=1", "model.n_embd=64"],
        )


def gpt(*args, cwd, **kwargs):
    script = str(Path(sys.executable).with_name("gpt"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [script, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_cli_refuses_a_corrupt_last_pth_and_fresh_moves_old_results_aside(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "checkpoint"\n')
    train_experiment(
        path,
        session_data_dir,
        tmp_path / "results",
        ["train.steps_per_epoch=2", "train.eval_batches=1"],
    )
    last = tmp_path / "results" / "tiny" / "checkpoints" / "last.pth"
    last.write_bytes(last.read_bytes()[:100])
    args = [
        "run",
        str(path),
        "--data-dir",
        str(session_data_dir),
        "--set",
        "train.steps_per_epoch=4",
        "--set",
        "train.eval_batches=1",
    ]
    proc = gpt(*args, cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"Error: {last.relative_to(tmp_path)}: not a readable checkpoint")
    )
    assert "Traceback" not in err
    proc = gpt(*args, "--fresh", cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "moved the old results to" in out
    moved = [p for p in (tmp_path / "results").iterdir() if p.name.startswith("tiny.old-")]
    assert len(moved) == 1 and (moved[0] / "checkpoints" / "last.pth").exists()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


KILL_RUN = [
    "--set",
    "train.epochs=2",
    "--set",
    "train.steps_per_epoch=40",
    "--set",
    "train.eval_every=20",
    "--set",
    "train.eval_batches=2",
    "--set",
    "train.log_every=1",
    "--set",
    "model.n_embd=64",
    "--set",
    "train.batch_size=16",
]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses_bit_for_bit(
    tiny_char_experiment, session_data_dir, tmp_path
):
    path = tiny_char_experiment(extra=ALL_CALLBACKS.format(every=40))
    common = ["run", str(path), "--data-dir", str(session_data_dir), *KILL_RUN]
    straight = gpt(*common, "--results-dir", "straight", cwd=tmp_path)
    assert straight.wait(timeout=600) == 0, straight.communicate()[1]

    killed = gpt(*common, "--results-dir", "killed", cwd=tmp_path)
    last = tmp_path / "killed" / "tiny" / "checkpoints" / "last.pth"
    wait_for(last, killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    # The first save is the core's, at step 20's evaluation (the plugin's is at 40).
    saved = load_checkpoint(last, resume=True)["step"]
    assert saved in (20, 40)
    resumed = gpt(*common, "--results-dir", "killed", cwd=tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resuming from step {saved} (epoch 1)" in out
    assert losses(tmp_path / "killed" / "tiny" / "metrics.jsonl") == losses(
        tmp_path / "straight" / "tiny" / "metrics.jsonl"
    )
    assert (tmp_path / "killed" / "tiny" / "samples" / "epoch_0002.txt").read_text() == (
        tmp_path / "straight" / "tiny" / "samples" / "epoch_0002.txt"
    ).read_text()


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_the_run_resumes(
    tiny_char_experiment, session_data_dir, tmp_path
):
    path = tiny_char_experiment(extra=ALL_CALLBACKS.format(every=1000))
    common = ["run", str(path), "--data-dir", str(session_data_dir), *KILL_RUN]
    proc = gpt(*common, cwd=tmp_path)
    wait_for(tmp_path / "results" / "tiny" / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    saved = load_checkpoint(tmp_path / "results" / "tiny" / "checkpoints" / "last.pth")
    assert 0 < saved["step"] < 80
    resumed = gpt(*common, cwd=tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resuming from step {saved['step']}" in out
    steps = [s for s, *_ in losses(tmp_path / "results" / "tiny" / "metrics.jsonl")]
    assert steps == list(range(1, 81))
