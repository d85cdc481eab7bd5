"""The ``gpt`` command.

Everything heavy (torch, datasets) is imported inside the commands that need it,
so ``gpt --help`` and ``gpt plugins`` stay fast. Plugins are loaded in
:func:`main`, never at import time, and handed to the commands through click's
context object.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from nanogpt_core import __version__
from nanogpt_core.config import ExperimentConfig, load_experiment
from nanogpt_core.errors import ConfigError, NanoGPTError
from nanogpt_core.main_process import end_process_group
from nanogpt_core.options import describe_fields
from nanogpt_core.plugins import Plugins, load_plugins

DEBUG_ENV = "GPT_DEBUG"
INTERRUPTED = 130


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """Whether tracebacks should be shown (``--debug`` or ``GPT_DEBUG=1``)."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    root = ctx.find_root() if ctx else None
    return bool(root and root.meta.get("gpt.debug"))


def report(error: NanoGPTError) -> None:
    """Print a user-facing error, one ``Error:`` line per problem, on stderr."""
    for line in str(error).splitlines() or [type(error).__name__]:
        click.echo(f"Error: {line}", err=True)


class GptGroup(click.Group):
    """A click group that turns :class:`NanoGPTError` into one-line errors and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand, reporting user errors without a traceback.

        Ctrl-C outside training (during start-up, preparing data) exits 130 like
        an interrupted run, not click's "Aborted!" with status 1.
        """
        try:
            return super().invoke(ctx)
        except NanoGPTError as error:
            if debug_enabled(ctx):
                raise
            report(error)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            if debug_enabled(ctx):
                raise
            click.echo("Interrupted.", err=True)
            ctx.exit(INTERRUPTED)
        finally:
            end_process_group()


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    ctx.meta["gpt.debug"] = value
    return value


def plugins_of(ctx: click.Context) -> Plugins:
    """The :class:`Plugins` this invocation was built with."""
    return ctx.find_object(Plugins) or load_plugins()


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


@click.command()
@EXPERIMENT
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a key; the value is a TOML literal (a bare word is a string).",
)
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
    from nanogpt_core.run import run_experiment

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
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key.")
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
    from nanogpt_core.datasets import prepare_dataset

    prepared = prepare_dataset(config, plugins_of(ctx), data_dir=data_dir, force=force)
    click.echo(f"prepared {prepared.folder}")


@click.command()
@click.option(
    "--ckpt",
    required=True,
    type=click.Path(path_type=Path),
    help="A checkpoint, e.g. results/<name>/checkpoints/last.pth.",
)
@click.option("--prompt", default=None, help="Text to continue (default: start of text).")
@click.option(
    "--prompt-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Read the prompt from a file.",
)
@click.option("--num-samples", default=1, show_default=True, type=click.IntRange(min=1))
@sampling_options
def sample(
    ckpt: Path,
    prompt: str | None,
    prompt_file: Path | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float | None,
    num_samples: int,
    seed: int,
    device: str,
) -> None:
    """Generate text from a checkpoint, streamed to stdout.

    The tokenizer comes from the checkpoint, so no data folder or experiment
    file is needed. BPE models stop at end-of-text.

    \b
    Examples:
      gpt sample --ckpt results/shakespeare_char/checkpoints/last.pth --prompt "ROMEO:"
      gpt sample --ckpt last.pth --temperature 0 --max-new-tokens 100
      gpt sample --ckpt last.pth --prompt-file prompt.txt --num-samples 3 --top-p 0.9
    """
    import torch

    from nanogpt_core.sampling import encode_prompt, load_model, stream_sample

    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise NanoGPTError(f"--prompt-file {prompt_file}: not UTF-8 text") from None
    loaded = load_model(ckpt, device)
    ids, dropped = encode_prompt(loaded, prompt)
    if dropped:
        click.echo(
            f"note: the prompt has {len(ids) + dropped} tokens; keeping its last "
            f"{len(ids)} (the model's block_size)",
            err=True,
        )
    generator = torch.Generator(device=loaded.device).manual_seed(seed)
    shown_prompt = loaded.tokenizer.decode(ids) if prompt else ""
    for n in range(num_samples):
        if n:
            click.echo("---------------")
        click.echo(shown_prompt, nl=False)
        for piece in stream_sample(
            loaded,
            ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        ):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()


@click.command()
@click.option(
    "--ckpt",
    required=True,
    type=click.Path(path_type=Path),
    help="A fine-tuned checkpoint, e.g. results/<name>/checkpoints/last.pth.",
)
@click.option(
    "--once", "question", default=None, metavar="QUESTION", help="Answer one question and exit."
)
@click.option(
    "--input",
    "input_text",
    default=None,
    metavar="TEXT",
    help="With --once: the input (context) that goes with the question.",
)
@sampling_options
@click.pass_context
def chat(
    ctx: click.Context,
    ckpt: Path,
    question: str | None,
    input_text: str | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float | None,
    seed: int,
    device: str,
) -> None:
    """Talk to a fine-tuned checkpoint through the template it was trained with.

    Answers stream as they are generated and end at end-of-text. Commands:
    /reset, /temperature X, /quit; Ctrl-D or Ctrl-C at the prompt ends, Ctrl-C
    during an answer stops that answer. With stdin not a terminal, each line is
    one question, answered on its own, and each answer is followed by a blank line.

    \b
    Examples:
      gpt chat --ckpt results/alpaca/checkpoints/last.pth
      gpt chat --ckpt last.pth --once "What is AI?" --temperature 0
      gpt chat --ckpt last.pth --once "Summarize this." --input "A long text..."
      gpt chat --ckpt last.pth < questions.txt > answers.txt
    """
    from nanogpt_core.chat import ChatSettings, start_chat

    if input_text is not None and question is None:
        raise click.UsageError("--input goes with --once")
    settings = ChatSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
    )
    start_chat(
        ckpt,
        settings=settings,
        seed=seed,
        device=device,
        question=question,
        input=input_text or "",
        plugins=plugins_of(ctx),
    )


@click.command()
@click.option(
    "--ckpt",
    required=True,
    type=click.Path(path_type=Path),
    help="A checkpoint, e.g. results/<name>/checkpoints/last.pth.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    default=None,
    envvar="NANOGPT_API_KEY",
    help="Require 'Authorization: Bearer KEY' on /v1/ (env: NANOGPT_API_KEY).",
)
@click.option(
    "--max-concurrency",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests generating at once.",
)
@click.option(
    "--queue-size",
    default=16,
    show_default=True,
    type=click.IntRange(min=0),
    help="Requests waiting for a slot; more get HTTP 429.",
)
@click.option(
    "--grace",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds that streams in flight get to finish after SIGTERM.",
)
@DEVICE
def serve(
    ckpt: Path,
    host: str,
    port: int,
    api_key: str | None,
    max_concurrency: int,
    queue_size: int,
    grace: float,
    device: str,
) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page at /.

    Endpoints: /v1/completions, /v1/chat/completions (through the checkpoint's
    template), /v1/models, /health. SIGTERM lets streams in flight finish
    (up to --grace seconds) and exits 0.

    \b
    Examples:
      gpt serve --ckpt results/alpaca/checkpoints/last.pth
      gpt serve --ckpt last.pth --port 8080 --api-key secret --max-concurrency 4
    """
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("fastapi", "uvicorn")):
        raise NanoGPTError("gpt serve needs the serve extra: pip install 'nanogpt[serve]'")
    from nanogpt_core.serve import serve as run_server

    run_server(
        ckpt,
        host=host,
        port=port,
        api_key=api_key,
        max_concurrency=max_concurrency,
        queue_size=queue_size,
        grace=grace,
        device=device,
    )


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
    from nanogpt_core.batch import experiments_in, run_batch, summary_table, write_batch_plot

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
    from nanogpt_core.compare import comparison_table, read_runs, require_matplotlib, write_plot

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


@click.command()
@click.option(
    "--ckpt", required=True, type=click.Path(path_type=Path), help="The checkpoint to export."
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="A new folder for the export."
)
@click.pass_context
def export(ctx: click.Context, ckpt: Path, out: Path) -> None:
    """Export a checkpoint as a Hugging Face transformers GPT-2 folder.

    GPT2LMHeadModel.from_pretrained(OUT) then gives the same logits as ours;
    GPT-2 BPE models also get their tokenizer files, and a fine-tuned model's
    template becomes the chat_template of tokenizer_config.json.

    \b
    Examples:
      gpt export --ckpt results/fineweb_gpt2/checkpoints/last.pth --out exports/fineweb_gpt2
    """
    from nanogpt_core.export import export_hf

    written = export_hf(ckpt, out, plugins_of(ctx))
    click.echo(f"exported {ckpt} to {out}/: {', '.join(written)}")


@click.command(name="eval")
@click.option(
    "--ckpt", required=True, type=click.Path(path_type=Path), help="The checkpoint to evaluate."
)
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
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a key of the experiment.",
)
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
    from nanogpt_core.eval_checkpoint import (
        append_to_run,
        check_loggable,
        evaluate_checkpoint,
        print_json,
        task_options,
    )
    from nanogpt_core.eval_suite import eval_task_names, format_table

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

    if not PartialState().is_main_process:
        return
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


def plugin_listing(plugins: Plugins) -> list[dict[str, Any]]:
    """Everything ``gpt plugins`` shows, as plain data (one entry per plugin)."""
    listing: list[dict[str, Any]] = []
    for info in plugins.loaded:
        hooks = sorted(
            impl.name
            for impl in plugins.manager.get_hookcallers(plugins.manager.get_plugin(info.name)) or []
        )
        listing.append(
            {
                "name": info.name,
                "module": info.module,
                "distribution": info.distribution,
                "version": info.version,
                "hooks": hooks,
                "registers": [
                    {
                        "kind": r.kind,
                        "name": r.name,
                        "description": r.description,
                        "options": describe_fields(r.options),
                        "conflict": plugins.registry(r.kind).conflicts.get(r.name),
                    }
                    for r in plugins.registrations_of(info.name)
                ],
            }
        )
    for info in plugins.broken:
        listing.append(
            {
                "name": info.name,
                "module": info.module,
                "distribution": info.distribution,
                "version": info.version,
                "error": info.error,
            }
        )
    return listing


@click.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def plugins_command(ctx: click.Context, as_json: bool) -> None:
    """List installed plugins, what they register and their options.

    \b
    Examples:
      gpt plugins
      gpt plugins --json
    """
    listing = plugin_listing(plugins_of(ctx))
    if as_json:
        click.echo(json.dumps(listing, indent=2, default=str))
        return
    for entry in listing:
        origin = (
            f"{entry['distribution']} {entry['version']}" if entry["distribution"] else "in-process"
        )
        if "error" in entry:
            click.echo(f"{entry['name']} ({origin}): BROKEN: {entry['error']}")
            continue
        click.echo(f"{entry['name']} ({origin}) hooks: {', '.join(entry['hooks'])}")
        for reg in entry["registers"]:
            click.echo(f"  {reg['kind']} {reg['name']}: {reg['description']}")
            if reg["conflict"]:
                click.echo(f"    CONFLICT: {reg['conflict']}")
            for opt in reg["options"]:
                default = "required" if opt["required"] else f"default {json.dumps(opt['default'])}"
                click.echo(f"    {opt['name']} ({default}): {opt['doc']}")


def make_cli(plugins: Plugins) -> click.Group:
    """Build the ``gpt`` group with the core commands and those plugins add."""

    @click.group(
        cls=GptGroup, context_settings={"obj": plugins, "help_option_names": ["-h", "--help"]}
    )
    @click.version_option(__version__, prog_name="gpt")
    @click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_debug,
        help="Show tracebacks for errors (env: GPT_DEBUG=1).",
    )
    def gpt() -> None:
        """Pre-train GPT models from experiment files, extended by plugins.

        \b
        Examples:
          gpt run experiments/shakespeare_char.toml
          gpt plugins
        """

    for command in (
        run,
        prepare,
        sample,
        chat,
        serve,
        batch,
        compare,
        export,
        eval_command,
        plugins_command,
    ):
        gpt.add_command(command)
    for failure in plugins.add_commands(gpt):
        click.echo(f"Warning: {failure}", err=True)
    return gpt


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``gpt`` console script."""
    try:
        plugins = load_plugins()
        for info in plugins.broken:
            origin = f" ({info.distribution} {info.version})" if info.distribution else ""
            click.echo(
                f"Warning: plugin {info.name!r}{origin} failed to load: {info.error}", err=True
            )
        cli = make_cli(plugins)
    except NanoGPTError as error:
        if debug_enabled() or "--debug" in (argv if argv is not None else sys.argv):
            raise
        report(error)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(INTERRUPTED)
    cli.main(args=argv, prog_name="gpt")
