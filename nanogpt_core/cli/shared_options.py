"""The click options and arguments that several ``gpt`` commands share.

Declared once so that ``--data-dir`` or ``--device`` mean the same, with the same
defaults and environment variables, in every command that takes them. Also the
loading of the experiment file such commands name (:func:`load_runnable`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nanogpt_core.cli.gpt_group import plugins_of
from nanogpt_core.config.experiment import ExperimentConfig
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.errors import ConfigError

EXPERIMENT = click.argument("experiment", type=click.Path(path_type=Path, dir_okay=False))
RESULTS_DIR = click.option(
    "--results-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default="results",
    envvar="NANOGPT_RESULTS_DIR",
    show_default=True,
    help="Where results/<name>/ folders go (env: NANOGPT_RESULTS_DIR).",
)
DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default="data",
    envvar="NANOGPT_DATA_DIR",
    show_default=True,
    help="Where prepared datasets go (env: NANOGPT_DATA_DIR).",
)
DEVICE = click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
# The sampling options `gpt sample` and `gpt chat` share, in the order --help shows them.
SAMPLING_OPTIONS = (
    click.option("--max-new-tokens", default=500, show_default=True, type=click.IntRange(min=1)),
    click.option(
        "--temperature",
        default=0.8,
        show_default=True,
        type=click.FloatRange(min=0),
        help="0 is greedy.",
    ),
    click.option("--top-k", default=200, show_default=True, type=click.IntRange(min=1)),
    click.option(
        "--top-p",
        default=None,
        type=click.FloatRange(0, 1, min_open=True),
        help="Nucleus sampling.",
    ),
    click.option("--seed", default=1337, show_default=True, type=int),
    DEVICE,
)


def sampling_options(command: Any) -> Any:
    """Add the shared sampling options to a command."""
    for option in reversed(SAMPLING_OPTIONS):
        command = option(command)
    return command


def overrides_option(help: str) -> Any:
    """``--set KEY=VALUE`` (repeatable), passed on as ``overrides``; each command words its help."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=help)


def ckpt_option(help: str) -> Any:
    """The required ``--ckpt`` of the commands that read a checkpoint."""
    return click.option("--ckpt", required=True, type=click.Path(path_type=Path), help=help)


def load_runnable(
    ctx: click.Context, experiment: Path, overrides: tuple[str, ...]
) -> ExperimentConfig:
    """Load an experiment with its plugins' options checked; refuse abstract bases."""
    config = load_experiment(experiment, overrides, plugins_of(ctx))
    if config.abstract:
        raise ConfigError(
            [
                f"{experiment}: abstract = true: this file is a base to extend, not an experiment to run"
            ]
        )
    return config
