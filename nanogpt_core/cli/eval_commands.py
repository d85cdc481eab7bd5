"""The commands that measure: ``gpt eval`` scores a checkpoint, ``gpt compare`` runs.

Evaluation imports torch and accelerate, and the comparison matplotlib for its
plot, so they are imported inside the commands: ``gpt --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from nanogpt_core.cli.gpt_group import plugins_of
from nanogpt_core.cli.shared_options import (
    DATA_DIR,
    DEVICE,
    ckpt_option,
    load_runnable,
    overrides_option,
)
from nanogpt_core.errors import NanoGPTError

if TYPE_CHECKING:
    from nanogpt_core.eval.checkpoint_eval import CheckpointEval
    from nanogpt_core.train.callbacks import RunPaths


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE.png",
    help="Also draw every run's train and val loss (and eval scores) into this PNG.",
)
@click.option(
    "--x",
    "x_axis",
    type=click.Choice(["step", "tokens", "elapsed"]),
    default="step",
    show_default=True,
    help="The plot's x axis: optimizer steps, tokens trained on, or seconds of training.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def compare(runs: tuple[Path, ...], plot: Path | None, x_axis: str, as_json: bool) -> None:
    """Compare runs: final and best val loss, steps, tokens, time, throughput, eval scores.

    Each RUN is a results folder (results/<name>/); the numbers are those of
    its metrics.jsonl. --plot needs matplotlib (pip install 'nanogpt[plot]').

    \b
    Examples:
      gpt compare results/small results/large
      gpt compare results/* --plot compare.png --x tokens
      gpt compare results/small --json
    """
    from nanogpt_core.eval.compare import (
        comparison_table,
        read_runs,
        require_matplotlib,
        write_plot,
    )

    if plot is not None:
        require_matplotlib("gpt compare --plot")
    summaries = read_runs(list(runs))
    if as_json:
        click.echo(json.dumps([run.summary() for run in summaries], indent=2))
    else:
        click.echo(comparison_table(summaries))
    if plot is not None:
        write_plot(summaries, plot, x_axis)
        click.echo(f"wrote {plot}", err=as_json)


@click.command(name="eval")
@ckpt_option("The checkpoint to evaluate.")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    help="An eval task (repeatable); default: the experiment's [eval.<task>] tables.",
)
@click.option(
    "--experiment",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The experiment whose data val_loss scores and whose [eval.<task>] options apply.",
)
@overrides_option("Override a key of the experiment.")
@click.option(
    "--data",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A local data file for the tasks that read one (hellaswag_val.jsonl).",
)
@click.option(
    "--option",
    "-o",
    "assignments",
    multiple=True,
    metavar="TASK.KEY=VALUE",
    help="Set a task option.",
)
@click.option(
    "--limit", type=click.IntRange(min=1), help="Score at most this many examples per task."
)
@click.option(
    "--batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Examples per forward pass.",
)
@DEVICE
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--log", is_flag=True, help="Also append the results to the run's metrics.jsonl.")
@DATA_DIR
@click.pass_context
def eval_command(
    ctx: click.Context,
    ckpt: Path,
    tasks: tuple[str, ...],
    experiment: Path | None,
    overrides: tuple[str, ...],
    data: Path | None,
    assignments: tuple[str, ...],
    limit: int | None,
    batch_size: int,
    device: str,
    as_json: bool,
    log: bool,
    data_dir: Path,
) -> None:
    """Evaluate a checkpoint on benchmark tasks (HellaSwag) or its experiment's loss.

    Runs unchanged under `accelerate launch`: the examples are split between
    the processes and the numbers are those of one process.

    \b
    Examples:
      gpt eval --ckpt results/fineweb/checkpoints/last.pth --task hellaswag --data hellaswag_val.jsonl
      gpt eval --ckpt last.pth --task val_loss --experiment experiments/fineweb.toml --json
      gpt eval --ckpt last.pth --task hellaswag --limit 500 --log
    """
    from nanogpt_core.eval.checkpoint_eval import check_loggable, evaluate_checkpoint, task_options
    from nanogpt_core.eval.suite import eval_task_names

    plugins = plugins_of(ctx)
    config = load_runnable(ctx, experiment, overrides) if experiment else None
    names = list(tasks) or (list(config.eval) if config is not None else [])
    if not names:
        installed = ", ".join(eval_task_names(plugins)) or "none"
        raise NanoGPTError(f"name a task with --task (installed: {installed})")
    run_paths = check_loggable(ckpt) if log else None
    options = task_options(names, plugins, config, data, assignments)
    result = evaluate_checkpoint(
        ckpt,
        names,
        plugins,
        experiment=config,
        data_dir=data_dir,
        device=device,
        limit=limit,
        batch_size=batch_size,
        options=options,
    )
    from accelerate import PartialState

    # Every process evaluated its share; one of them reports.
    if PartialState().is_main_process:
        _report_eval(ckpt, result, run_paths, as_json)


def _report_eval(
    ckpt: Path, result: CheckpointEval, run_paths: RunPaths | None, as_json: bool
) -> None:
    """Log ``gpt eval``'s result to the run if ``--log`` asked, and print it."""
    from nanogpt_core.eval.checkpoint_eval import append_to_run, print_json
    from nanogpt_core.eval.suite import format_table

    if run_paths is not None:
        append_to_run(run_paths, result)
    if as_json:
        click.echo(print_json(result))
        return
    click.echo(f"{ckpt} (step {result.step})")
    click.echo(format_table(result.reports))
    for report in result.reports:
        for note in report.notes:
            click.echo(f"note: {report.task}: {note}")
    if run_paths is not None:
        click.echo(f"logged to {run_paths.metrics}")
