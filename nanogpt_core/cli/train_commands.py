"""The commands that train: ``gpt run``, ``gpt prepare`` and ``gpt batch``.

Training and data preparation import torch and datasets, so they are imported
inside the commands: ``gpt --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from nanogpt_core.cli.gpt_group import plugins_of
from nanogpt_core.cli.shared_options import (
    DATA_DIR,
    EXPERIMENT,
    RESULTS_DIR,
    load_runnable,
    overrides_option,
)


@click.command()
@EXPERIMENT
@overrides_option("Override a key; the value is a TOML literal (a bare word is a string).")
@click.option(
    "--fresh", is_flag=True, help="Start over: move old results aside instead of resuming."
)
@click.option("--dry-run", is_flag=True, help="Print the resolved experiment as JSON and exit.")
@RESULTS_DIR
@DATA_DIR
@click.pass_context
def run(
    ctx: click.Context,
    experiment: Path,
    overrides: tuple[str, ...],
    fresh: bool,
    dry_run: bool,
    results_dir: Path,
    data_dir: Path,
) -> None:
    """Train the model an experiment file describes.

    \b
    Examples:
      gpt run experiments/shakespeare_char.toml
      gpt run experiments/fineweb.toml --set train.learning_rate=3e-4 --set model.n_layer=4
      gpt run experiments/fineweb.toml --dry-run
      accelerate launch --multi_gpu --num_processes 8 -m nanogpt_core run experiments/fineweb.toml
    """
    config = load_runnable(ctx, experiment, overrides)
    if dry_run:
        click.echo(json.dumps(config.to_dict(), indent=2))
        return
    from nanogpt_core.train.run import run_experiment

    run_experiment(
        config,
        plugins_of(ctx),
        results_dir=results_dir,
        data_dir=data_dir,
        fresh=fresh,
    )


@click.command()
@EXPERIMENT
@click.option("--force", is_flag=True, help="Prepare again even if the data is up to date.")
@overrides_option("Override a key.")
@DATA_DIR
@click.pass_context
def prepare(
    ctx: click.Context, experiment: Path, force: bool, overrides: tuple[str, ...], data_dir: Path
) -> None:
    """Prepare an experiment's dataset and nothing else.

    Writes train.bin, val.bin and meta.json under the data folder.

    \b
    Examples:
      gpt prepare experiments/shakespeare_char.toml
      gpt prepare experiments/fineweb.toml --force --data-dir /scratch/data
    """
    config = load_runnable(ctx, experiment, overrides)
    from nanogpt_core.data.preparation import prepare_dataset

    prepared = prepare_dataset(config, plugins_of(ctx), data_dir=data_dir, force=force)
    click.echo(f"prepared {prepared.folder}")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--launcher",
    default=None,
    metavar="COMMAND",
    help='Put a launcher in front of each run, e.g. "accelerate launch --num_processes 8".',
)
@click.option(
    "--rerun", is_flag=True, help="Run finished experiments again (old results are moved aside)."
)
@click.option("--stop-on-error", is_flag=True, help="Stop at the first failed experiment.")
@RESULTS_DIR
@DATA_DIR
def batch(
    paths: tuple[Path, ...],
    launcher: str | None,
    rerun: bool,
    stop_on_error: bool,
    results_dir: Path,
    data_dir: Path,
) -> None:
    """Run experiments one after another, each in its own process.

    A folder runs the files its experiment_list.conf lists (one a line, #
    comments), else its *.toml files in sorted order, skipping abstract bases.
    Finished experiments are skipped, interrupted ones resume. Exit status 1 if
    any failed.

    \b
    Examples:
      gpt batch experiments/
      gpt batch experiments/tinystories.toml experiments/fineweb.toml --stop-on-error
      gpt batch experiments/ --launcher "accelerate launch --multi_gpu --num_processes 8"
    """
    from nanogpt_core.cli.batch_runs import (
        experiments_in,
        run_batch,
        summary_table,
        write_batch_plot,
    )

    experiments = experiments_in(list(paths))
    results = run_batch(
        experiments,
        launcher=launcher,
        rerun=rerun,
        stop_on_error=stop_on_error,
        results_dir=results_dir,
        data_dir=data_dir,
    )
    write_batch_plot(results, results_dir)
    click.echo(summary_table(results))
    if any(r.status == "failed" for r in results):
        sys.exit(1)
