"""``gpt plan``: what an experiment will need (memory, time, disk, data) before it runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from nanogpt_core.cli.gpt_group import plugins_of
from nanogpt_core.cli.shared_options import (
    DATA_DIR,
    EXPERIMENT,
    RESULTS_DIR,
    FiniteFloatRange,
    load_runnable,
    overrides_option,
)

INTERCONNECTS = ("nvlink", "pcie", "infiniband")


class GpusType(click.ParamType):
    """``N[xNAME]``: how many GPUs, and which kind from the table (``8xV100-32GB``)."""

    name = "N[xNAME]"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        """``(count, name or None)``, or a one-line usage error naming the choices."""
        if isinstance(value, tuple):
            return value
        from nanogpt_core.plan.hardware import parse_gpus

        try:
            return parse_gpus(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.command("plan")
@EXPERIMENT
@overrides_option("Override a key, as gpt run would.")
@click.option(
    "--gpus",
    type=GpusType(),
    default="1",
    show_default=True,
    help="How many devices, and which GPU: 8xV100-32GB, 8xA100-80GB, 16xH100-80GB (a name "
    "not in the table lists the table's). Without a name: this machine's device.",
)
@click.option(
    "--interconnect",
    type=click.Choice(INTERCONNECTS),
    help="The link gradients are all-reduced over. Default: NVLink on SXM cards, PCIe on "
    "PCIe cards, InfiniBand beyond 8 GPUs.",
)
@click.option(
    "--mfu",
    type=FiniteFloatRange(0, 1, min_open=True),
    help="Model FLOPs utilisation to assume (0-1). Default: a previous run's in the results "
    "folder, else the GPU table's.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@RESULTS_DIR
@DATA_DIR
@click.pass_context
def plan_command(
    ctx: click.Context,
    experiment: Path,
    overrides: tuple[str, ...],
    gpus: tuple[int, str | None],
    interconnect: str | None,
    mfu: float | None,
    as_json: bool,
    results_dir: Path,
    data_dir: Path,
) -> None:
    """Say what an experiment needs before running it: memory, time, disk, data.

    Reads the experiment as gpt run does (the same checks) and trains, downloads
    and writes nothing. The data's unique tokens are counted in meta.json when it
    is prepared, else estimated by the dataset plugin.

    \b
    Examples:
      gpt plan experiments/fineweb.toml --gpus 8xV100-32GB
      gpt plan experiments/fineweb.toml --gpus 8xA100-80GB --set train.batch_size=32
      gpt plan experiments/shakespeare_char.toml --json
    """
    from nanogpt_core.plan.hardware import local_hardware, named_hardware
    from nanogpt_core.plan.planner import make_plan
    from nanogpt_core.plan.report import plan_json, plan_table
    from nanogpt_core.train.run import make_callbacks

    config = load_runnable(ctx, experiment, overrides)
    plugins = plugins_of(ctx)
    count, name = gpus
    hardware = named_hardware(count, name) if name else local_hardware(count, config.train.device)
    plan = make_plan(
        config,
        plugins,
        hardware,
        data_dir=data_dir,
        results_dir=results_dir,
        callbacks=make_callbacks(config, plugins),
        interconnect=interconnect,
        mfu=mfu,
    )
    click.echo(json.dumps(plan_json(plan), indent=2) if as_json else plan_table(plan))
