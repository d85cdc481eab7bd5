"""``gpt plan``: its figures checked against what a run really builds, prepares and saves.

The plan is read from ``gpt plan --json`` in a subprocess (the real command)
and compared with the model, the prepared files and the checkpoint a real run
of the same experiment leaves on disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt_core.model.config import GPTConfig
from nanogpt_core.model.gpt import GPT
from nanogpt_core.train.checkpoints import load_checkpoint


def gpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``gpt ARGS`` in a subprocess, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def plan_of(experiment: Path, *args: str) -> dict:
    """The plan ``gpt plan --json`` prints for ``experiment``."""
    done = gpt("plan", str(experiment), "--json", *args, cwd=experiment.parent)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def prepared(tiny_char_experiment, tmp_path) -> tuple[Path, Path]:
    """A tiny char experiment and its data folder, prepared by ``gpt prepare``."""
    experiment = tiny_char_experiment("planned")
    data = tmp_path / "data"
    done = gpt("prepare", str(experiment), "--data-dir", str(data), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return experiment, data


def test_the_plan_counts_what_the_run_builds_prepares_and_saves(prepared, tmp_path):
    experiment, data = prepared
    results = tmp_path / "results"
    plan = plan_of(experiment, "--data-dir", str(data), "--results-dir", str(results))
    done = gpt(
        "run", str(experiment), "--data-dir", str(data), "--results-dir", str(results),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # gpt run prints the plan's line before it trains, with the same figures.
    line = next(line for line in done.stdout.splitlines() if line.startswith("plan: "))
    assert "40 steps" in line and "parameters" in line

    checkpoint = results / "planned" / "checkpoints" / "last.pth"
    saved = load_checkpoint(checkpoint)
    model = GPT(GPTConfig(**saved["model_args"]))
    assert plan["model"]["parameters"] == model.num_params()
    assert plan["model"]["flops_per_token"] == model.flops_per_token()

    # The data: the tokens meta.json counts, stored at the dtype's width, are the .bin files.
    folder = Path(plan["disk"]["data_folder"])
    meta = json.loads((folder / "meta.json").read_text())
    bins = sum((folder / f"{split}.bin").stat().st_size for split in ("train", "val"))
    figures = plan["data"]
    assert figures["source"] == "prepared"
    assert figures["train_tokens"] == meta["splits"]["train"]["tokens"]
    assert (figures["train_tokens"] + figures["val_tokens"]) * figures["dtype_bytes"] == bins
    assert plan["disk"]["data_bytes"] == sum(p.stat().st_size for p in folder.iterdir())
    # Tokens per step: batch x block x accumulation x processes; passes follow.
    assert figures["tokens_per_step"] == 8 * 32
    assert figures["training_tokens"] == 40 * 8 * 32
    assert figures["passes"] == pytest.approx(40 * 8 * 32 / meta["splits"]["train"]["tokens"])

    # The checkpoint: within 5 % of the real file.
    real = checkpoint.stat().st_size
    assert plan["disk"]["checkpoint_bytes"] == pytest.approx(real, rel=0.05)
    assert plan["disk"]["checkpoints_kept"] == 1


def test_muon_state_is_measured_from_the_plugin_and_matches_the_checkpoint(prepared, tmp_path):
    experiment, data = prepared
    results = tmp_path / "results"
    args = ("--data-dir", str(data), "--results-dir", str(results), "--set", "train.optimizer=muon")
    adamw = plan_of(experiment, "--data-dir", str(data))
    muon = plan_of(experiment, *args)
    # Muon keeps one buffer on the block matrices, AdamW two on everything.
    assert muon["memory"]["optimizer_measured"] is True
    assert muon["memory"]["estimate"]["optimizer"] < adamw["memory"]["estimate"]["optimizer"]
    assert adamw["memory"]["estimate"]["optimizer"] == pytest.approx(
        8 * adamw["model"]["parameters"], rel=0.001
    )
    done = gpt("run", str(experiment), *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    real = (results / "planned" / "checkpoints" / "last.pth").stat().st_size
    assert muon["disk"]["checkpoint_bytes"] == pytest.approx(real, rel=0.05)


def test_time_follows_the_gpu_table_and_the_flops_the_run_counts(prepared):
    experiment, data = prepared
    plan = plan_of(experiment, "--data-dir", str(data), "--gpus", "8xA100-80GB")
    shape = GPT(
        GPTConfig(
            n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=plan["model"]["vocab_size"]
        )
    ).flops_per_token()
    assert plan["model"]["flops_per_token"] == shape
    tokens = 40 * 8 * 32 * 8  # steps x batch x block x GPUs
    assert plan["data"]["training_tokens"] == tokens
    assert plan["time"]["peak"] == 312e12 and plan["time"]["mfu"] == 0.45
    assert plan["time"]["seconds"] == pytest.approx(shape * tokens / (8 * 312e12 * 0.45))
    # Eight SXM A100s all-reduce float32 gradients over NVLink (230 GB/s bus bandwidth).
    gradients = 4 * plan["model"]["parameters"]
    assert plan["time"]["interconnect"] == "nvlink"
    assert plan["time"]["allreduce_seconds"] == pytest.approx(2 * 7 / 8 * gradients / 230e9)
    assert plan["memory"]["precision"] == "bf16"
    assert plan["memory"]["device_memory"] == 80 * 2**30 and plan["memory"]["fits"] is True
    v100 = plan_of(experiment, "--data-dir", str(data), "--gpus", "2xV100-16GB")
    assert v100["memory"]["precision"] == "fp16" and v100["time"]["peak"] == 125e12


def test_a_previous_runs_mfu_is_assumed_and_too_many_passes_warned(prepared, tmp_path):
    experiment, data = prepared
    results = tmp_path / "results"
    (results / "planned").mkdir(parents=True)
    lines = [{"step": s, "mfu": m} for s, m in ((10, 0.2), (20, 0.3), (30, None), (40, 0.4))]
    (results / "planned" / "metrics.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 5'  # a cut last line
    )
    args = ("--data-dir", str(data), "--results-dir", str(results), "--gpus", "4xH100-80GB")
    plan = plan_of(experiment, *args)
    assert plan["time"]["mfu"] == pytest.approx(0.3)
    assert "measured" in plan["time"]["mfu_source"]
    assert plan_of(experiment, *args, "--mfu", "0.5")["time"]["mfu"] == 0.5
    # 40 steps of 4 GPUs x 8 x 32 tokens go over Tiny Shakespeare's ~1M train tokens
    # a fraction of a time; 5,000 steps go over it 5 times.
    many = plan_of(experiment, *args, "--set", "train.steps_per_epoch=5000")
    assert many["data"]["passes"] > 4
    assert any("Muennighoff" in warning for warning in many["warnings"])
    table = gpt("plan", str(experiment), *args, "--set", "train.steps_per_epoch=5000",
                cwd=tmp_path)  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "warning: data:" in table.stdout and "passes" in table.stdout
    for section in ("model", "data", "memory", "time", "disk"):
        assert f"  {section}" in table.stdout


def test_epoch_files_the_checkpoint_callback_keeps_are_counted(prepared):
    experiment, data = prepared
    text = experiment.read_text().replace("epochs = 1", "epochs = 5")
    experiment.write_text(text + '\n[[callbacks]]\nplugin = "checkpoint"\nkeep_last = 2\n')
    plan = plan_of(experiment, "--data-dir", str(data))
    assert plan["disk"]["checkpoints_kept"] == 3  # last.pth and two epoch files
    assert plan["disk"]["checkpoints_bytes"] == 3 * plan["disk"]["checkpoint_bytes"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--gpus", "8xV100"), "several GPUs match 'V100'"),
        (("--gpus", "8xB300"), "unknown GPU 'B300'"),
        (("--gpus", "0xA100-80GB"), "at least 1"),
        (("--mfu", "1.5"), "--mfu"),
        (("--gpus", "2xV100-32GB", "--set", "train.mixed_precision=bf16"), "no bf16 units"),
        (("--gpus", "2xV100-PCIe-32GB", "--interconnect", "nvlink"), "has no NVLink"),
    ],
)
def test_bad_plan_options_are_one_line_and_exit_2(prepared, args, message):
    experiment, data = prepared
    done = gpt("plan", str(experiment), "--data-dir", str(data), *args, cwd=experiment.parent)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_planning_writes_nothing(tiny_char_experiment, tmp_path):
    experiment = tiny_char_experiment("unprepared")
    data, results = tmp_path / "data", tmp_path / "results"
    done = gpt(
        "plan", str(experiment), "--data-dir", str(data), "--results-dir", str(results),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not data.exists() and not results.exists()
    assert "not prepared yet" in done.stdout


REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", ["fineweb", "fineweb_fast"])
def test_shipped_fineweb_experiments_make_at_most_4_passes_and_fit_v100s(name, tmp_path):
    experiment = REPO / "experiments" / f"{name}.toml"
    text = experiment.read_text()
    for gpus, precision in (("8xV100-32GB", "fp16"), ("8xA100-80GB", "bf16")):
        plan = plan_of(
            experiment, "--gpus", gpus, "--data-dir", str(tmp_path / "data"),
            "--results-dir", str(tmp_path / "results"),
        )  # fmt: skip
        # Offline: the hub's published size, nothing downloaded.
        assert plan["data"]["source"] == "estimated"
        assert plan["data"]["passes"] <= 4
        assert plan["memory"]["precision"] == precision and plan["memory"]["fits"] is True
        assert plan["warnings"] == []
        # The file's comments say what the plan prints.
        assert f"{plan['data']['passes']:.2g} passes" in text
        hours = plan["time"]["seconds"] / 3600
        shown = f"about {hours:.1f} h" if hours >= 1.5 else f"about {hours * 60:.0f} min"
        assert f"{gpus.replace('x', ' x ', 1)}: {shown}" in text
    assert not (tmp_path / "data").exists()


def test_fsdp_shards_the_state_per_process_and_the_table_says_so(prepared):
    experiment, data = prepared
    gpus = ("--data-dir", str(data), "--gpus", "4xV100-16GB")
    ddp = plan_of(experiment, *gpus)["memory"]
    fsdp = plan_of(experiment, *gpus, "--set", "train.parallelism=fsdp")["memory"]
    assert (ddp["parallelism"], ddp["shards"], fsdp["parallelism"], fsdp["shards"]) == (
        "ddp", 1, "fsdp", 4
    )  # fmt: skip
    for part in ("gradients", "optimizer"):
        assert fsdp["estimate"][part] == -(-ddp["estimate"][part] // 4), part
    # Besides its quarter, a process holds what FSDP gathers whole: the root unit
    # (embeddings, last norm) and two blocks, in float32: here (two blocks) all of it.
    gathered = fsdp["estimate"]["weights"] - -(-ddp["estimate"]["weights"] // 4)
    assert gathered == ddp["estimate"]["weights"]
    assert fsdp["estimate"]["activations"] == ddp["estimate"]["activations"]
    done = gpt("plan", str(experiment), *gpus, "--set", "train.parallelism=fsdp", cwd=data.parent)
    assert done.returncode == 0, done.stderr
    assert "fsdp: weights, gradients and optimizer state in 4 shards" in done.stdout
