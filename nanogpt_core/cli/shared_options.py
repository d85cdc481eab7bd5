"""The click options and arguments that several ``gpt`` commands share.

Declared once so that ``--data-dir`` or ``--device`` mean the same, with the same
defaults and environment variables, in every command that takes them. Also the
loading of the experiment file such commands name (:func:`load_runnable`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import click

from nanogpt_core.cli.gpt_group import plugins_of
from nanogpt_core.config.experiment import ExperimentConfig
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.errors import ConfigError


def folder_path(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """A folder option's value, refused in one line when a part of it is a file.

    click checks the path itself; a file further up (``--data-dir notes.txt/data``)
    would otherwise surface as ``NotADirectoryError`` when the first file is written.
    """
    if value is None:
        return value
    for part in (value, *value.parents):
        if part.exists():
            if not part.is_dir():
                raise click.BadParameter(
                    f"{part} is a file, not a folder; choose a folder path", ctx, param
                )
            break
    return value


EXPERIMENT = click.argument("experiment", type=click.Path(path_type=Path, dir_okay=False))
RESULTS_DIR = click.option(
    "--results-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default="results",
    envvar="NANOGPT_RESULTS_DIR",
    show_default=True,
    callback=folder_path,
    help="Where results/<name>/ folders go (env: NANOGPT_RESULTS_DIR).",
)
DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default="data",
    envvar="NANOGPT_DATA_DIR",
    show_default=True,
    callback=folder_path,
    help="Where prepared datasets go (env: NANOGPT_DATA_DIR).",
)


class SamplingSetting(click.ParamType):
    """A sampling setting (``temperature``, ``top_p``, ``seed``) checked by its range.

    The ranges are :mod:`nanogpt_core.generate.sampling_settings`'s, the ones
    ``gpt serve`` checks its requests with.
    """

    def __init__(self, setting: str, kind: type) -> None:
        self.setting = setting
        self.kind = kind
        self.name = kind.__name__

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        """The value as a number, or a one-line usage error naming the range."""
        from nanogpt_core.generate.sampling_settings import sampling_problem

        if isinstance(value, self.kind) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = self.kind(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a number", param, ctx)
        problem = sampling_problem(self.setting, number)
        if problem:
            self.fail(problem, param, ctx)
        return number


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf`` (which compare as in range)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        """The number, or a one-line usage error when it is not finite or not in range."""
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


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
        type=SamplingSetting("temperature", float),
        help="0 is greedy; else 1e-4 to 1e4.",
    ),
    click.option("--top-k", default=200, show_default=True, type=click.IntRange(min=1)),
    click.option(
        "--top-p",
        default=None,
        type=SamplingSetting("top_p", float),
        help="Nucleus sampling: above 0, at most 1.",
    ),
    click.option("--seed", default=1337, show_default=True, type=SamplingSetting("seed", int)),
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
    """Load an experiment with its plugins' options checked; refuse abstract bases.

    Options that nothing uses are one ``warning:`` line each on stderr, printed by
    the main process only: ``accelerate launch`` starts one ``gpt`` per GPU.
    """
    warnings: list[str] = []
    config = load_experiment(experiment, overrides, plugins_of(ctx), warnings)
    if os.environ.get("RANK", "0") == "0":
        for line in warnings:
            click.echo(f"warning: {line}", err=True)
    if config.abstract:
        raise ConfigError(
            [
                f"{experiment}: abstract = true: this file is a base to extend, not an experiment to run"
            ]
        )
    return config
