"""Two CPU processes under `accelerate launch` (gloo): different batches, equal weights."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

PROBE = Path(__file__).with_name("distributed_probe.py")


@pytest.mark.slow
def test_two_processes_draw_different_batches_and_stay_in_sync(
    tiny_char_experiment, session_data_dir, tmp_path
):
    experiment = tiny_char_experiment(name="ddp")
    results, probe = tmp_path / "results", tmp_path / "probe"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    command = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29533",
        str(PROBE),
        str(experiment),
        str(results),
        str(session_data_dir),
        str(probe),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["processes"] for r in ranks] == [2, 2]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert [r["is_main"] for r in ranks] == [True, False]
    # The same initial weights, but each rank draws its own dropout masks.
    assert ranks[0]["rng_at_start"] != ranks[1]["rng_at_start"]
    # One writer: each logged step appears once, and the folder holds only its files.
    run = results / "ddp"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "config.json",
        "done",
        "metrics.jsonl",
    ]
    # Saved once, with both ranks' sampler and RNG states inside.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "ckpt_epoch_1.pth",
        "last.pth",
    ]
    last = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    assert len(last["ranks"]) == 2
    assert not torch.equal(
        last["ranks"][0]["rng"]["torch"], last["ranks"][1]["rng"]["torch"]
    ) or not torch.equal(
        last["ranks"][0]["sampler"]["generator"], last["ranks"][1]["sampler"]["generator"]
    )
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 41, 5))
    assert done.stdout.count("model: ") == 1

    # Resume under the launcher: both ranks continue from step 40 in sync.
    resumed = subprocess.run(
        [*command, "train.epochs=2"], capture_output=True, text=True, timeout=600, check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["start_step"], r["end_step"]) for r in ranks] == [(40, 80), (40, 80)]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(5, 81, 5))
    # tokens counts both processes (batch 8 x block 32 each), across the resume.
    assert [line["tokens"] for line in lines] == [step * 8 * 32 * 2 for step in range(5, 81, 5)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, *args: str) -> list[str]:
    """``accelerate launch`` of ``script`` on two CPU processes (gloo)."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(script), *args,
    ]  # fmt: skip


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_a_stop_seen_by_one_process_stops_every_process_at_the_same_step(
    tiny_char_experiment, session_data_dir, tmp_path
):
    """SIGTERM to rank 1 alone: both ranks stop after the same step and save, no hang."""
    experiment = tiny_char_experiment(name="stop1")
    results, probe = tmp_path / "results", tmp_path / "probe"
    command = launch(
        PROBE, str(experiment), str(results), str(session_data_dir), str(probe),
        "train.steps_per_epoch=100000", "train.eval_every=100000",
    )  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as launcher:
        metrics = results / "stop1" / "metrics.jsonl"
        wait_for(
            lambda: (
                (probe / "pid1").exists()
                and metrics.exists()
                and len(metrics.read_text().splitlines()) >= 2
            ),
            300,
            "both ranks to train",
        )
        os.kill(int((probe / "pid1").read_text()), signal.SIGTERM)
        try:
            _, stderr = launcher.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.kill()
            raise AssertionError("the ranks hung after one of them was asked to stop") from None
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["status"] for r in ranks] == ["interrupted", "interrupted"], stderr[-2000:]
    assert ranks[0]["end_step"] == ranks[1]["end_step"] < 100000
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    last = torch.load(results / "stop1" / "checkpoints" / "last.pth", weights_only=True)
    assert last["step"] == ranks[0]["end_step"]
    assert "stopped by SIGTERM after step" in stderr
    assert "stopped by a stop request on another process after step" in stderr


PREPARE_PROBE = Path(__file__).with_name("prepare_probe.py")


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["ok", "fails"])
def test_preparing_longer_than_the_process_group_timeout_does_not_time_out(outcome, tmp_path):
    """The training group's timeout is 3 s here; the main process prepares for 8 s."""
    command = launch(PREPARE_PROBE, str(tmp_path), outcome)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if outcome == "ok":
        assert done.returncode == 0, done.stderr[-3000:]
        seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
        # The main process prepared; the other one then found the result.
        assert seen == [
            {"prepared": "by rank 0", "calls": 1},
            {"prepared": "by rank 0", "calls": 1},
        ]
    else:
        assert done.returncode != 0
        # Both ranks stop with the main process's one line (and its exit status, 2).
        assert done.stderr.count("Error: bad rows in the source") == 2
        exits = [json.loads((tmp_path / f"exit{r}.json").read_text()) for r in (0, 1)]
        assert exits == [2, 2]
