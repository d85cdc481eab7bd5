"""Two CPU processes under `accelerate launch` (gloo): different batches, equal weights."""

from __future__ import annotations

import json
import subprocess
import sys
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
