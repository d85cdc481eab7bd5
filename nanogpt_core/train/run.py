"""Running an experiment end to end: lock, data, checks, callbacks, trainer.

This is what ``gpt run`` calls once the experiment file has been read and
checked. It is also what every process runs under ``accelerate launch``. Every
check that can fail on the user's input runs before anything is moved, built or
written: a bad experiment leaves the results folder exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanogpt_core.config.experiment import ExperimentConfig, TrainConfig
from nanogpt_core.errors import ConfigError, NanoGPTError
from nanogpt_core.files import atomic_write_text, remove_stale_temporaries
from nanogpt_core.main_process import on_main_process
from nanogpt_core.plugins.registry import Plugins, check_callback
from nanogpt_core.train.callbacks import RunPaths
from nanogpt_core.train.lost_peers import lost_peers
from nanogpt_core.train.resume import config_differences


def resolve_precision(setting: str, device: Any) -> str:
    """The autocast precision for ``train.mixed_precision`` on this process's ``device``.

    ``auto``: bf16 on GPUs with bf16 units (compute capability 8.0+: A100,
    H100), fp16 with loss scaling on older GPUs (V100), no autocast on the CPU.
    """
    from nanogpt_core.gpus import auto_precision

    return auto_precision(device) if setting == "auto" else setting


def make_accelerator(train: TrainConfig) -> Any:
    """An ``Accelerator`` for ``[train]``, refusing precisions the hardware lacks.

    Accelerate's ``PartialState`` comes first: it starts the process group and
    sets this process's device (``LOCAL_RANK``). Only then is the device asked
    what it supports, so under ``accelerate launch`` no rank opens a CUDA
    context on GPU 0 (each costs GPU 0 several hundred MB). The group's
    timeout is ``train.distributed_timeout_s``: how long a collective waits for
    a hung peer before it raises (see :mod:`nanogpt_core.train.lost_peers`).
    """
    import datetime

    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    from nanogpt_core.gpus import allow_tf32, has_bf16_units

    has_cuda = torch.cuda.is_available()
    if train.device == "cuda" and not has_cuda:
        raise NanoGPTError(
            'train.device = "cuda" but no CUDA device is available; use "auto" or "cpu"'
        )
    cpu = train.device == "cpu" or not has_cuda
    timeout = datetime.timedelta(seconds=train.distributed_timeout_s)
    device = PartialState(cpu=cpu, timeout=timeout).device
    precision = resolve_precision(train.mixed_precision, device)
    if precision == "fp16" and cpu:
        raise NanoGPTError(
            'train.mixed_precision = "fp16" needs a GPU; use "auto", "bf16" or "no" on the CPU'
        )
    if precision == "bf16" and not cpu and not has_bf16_units(device):
        name = torch.cuda.get_device_name(device)
        raise NanoGPTError(
            f'train.mixed_precision = "bf16": {name} has no bf16 units (it would emulate them, '
            'slowly and without loss scaling); use "auto" or "fp16"'
        )
    if not cpu:
        allow_tf32(device)
    # One process may run several experiments (tests, notebooks): forget the last
    # one's precision settings. The distributed set-up (PartialState) is kept.
    AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        cpu=cpu,
    )


def move_aside(root: Path) -> Path | None:
    """Rename an old results folder to ``<name>.old-<time>`` so nothing is deleted."""
    if not root.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = root.with_name(f"{root.name}.old-{stamp}")
    suffix = 1
    while target.exists():
        target = root.with_name(f"{root.name}.old-{stamp}-{suffix}")
        suffix += 1
    root.rename(target)
    return target


def read_done(paths: RunPaths) -> dict[str, Any] | None:
    """The ``done`` marker's final metrics; a missing or damaged marker is None."""
    try:
        summary = json.loads(paths.done.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("step"), int):
        return None
    return summary


def finished_summary(config: ExperimentConfig, paths: RunPaths) -> dict[str, Any] | None:
    """The final metrics of a run that already did all of this experiment's steps, else None.

    A ``done`` run whose experiment now asks for more steps is not finished: it
    resumes from its checkpoint.
    """
    summary = read_done(paths)
    if summary is None:
        return None
    train = config.train
    if train.steps_per_epoch is None:  # an epoch follows from the data: count epochs
        return summary if summary.get("epoch", 0) >= train.epochs else None
    return summary if summary["step"] >= train.epochs * train.steps_per_epoch else None


def check_same_experiment(config: ExperimentConfig, paths: RunPaths) -> None:
    """Refuse to reuse a results folder that holds another experiment's ``config.json``."""
    try:
        saved = json.loads(paths.config.read_text())
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise ConfigError(
            [f"{paths.config}: unreadable; use --fresh to start over in {paths.root}"]
        )
    found = config_differences(saved, config.to_dict())
    if found:
        shown = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
        raise ConfigError(
            [
                f"{paths.root} holds a run of a different experiment ({shown}); "
                "use --fresh to move it aside and start over, or set another name"
            ]
        )


def check_data_fits(config: ExperimentConfig, data: Any) -> None:
    """``block_size`` must leave at least one training window in each split."""
    block = config.model.block_size
    tokens, split = min((int(data.meta["splits"][s]["tokens"]), s) for s in ("train", "val"))
    if tokens < block + 1:
        raise ConfigError(
            [
                f"model.block_size = {block}: the {split} split of {data.folder} has only "
                f"{tokens} tokens, fewer than one window of block_size + 1; lower "
                f"model.block_size (at most {max(tokens - 1, 0)}) or use more data"
            ]
        )


def check_memory(
    config: ExperimentConfig,
    model_config: Any,
    device: Any,
    precision: str = "no",
    *,
    optimizer_bytes: int | None = None,
    shards: int = 1,
) -> None:
    """Refuse a run whose estimated peak memory exceeds what ``device`` has free.

    The estimate is the project's one (:func:`estimate_training_memory`): weights,
    gradients, the optimizer's state (this process's share of the three under
    FSDP: ``shards``) and one micro-batch's activations.

    :param precision: the run's autocast precision (``"no"``, ``"bf16"``, ``"fp16"``).
    :param optimizer_bytes: the optimizer's state as measured by the plan
        (default: AdamW's 8 bytes per parameter).
    """
    from nanogpt_core.train.memory import available_bytes, estimate_training_memory, human_bytes

    if not config.train.memory_check:
        return
    batch = config.train.batch_size
    estimate = estimate_training_memory(
        model_config,
        batch_size=batch,
        precision=precision,
        optimizer_bytes=optimizer_bytes,
        activation_checkpointing=config.train.activation_checkpointing,
        shards=shards,
    )
    available, where = available_bytes(device)
    if available is None or estimate.total <= available:
        return
    state = estimate.weights + estimate.gradients + estimate.optimizer
    raise ConfigError(
        [
            f"model: {estimate.parameters:,} parameters and micro-batches of {batch} x "
            f"{model_config.block_size} tokens need about {human_bytes(estimate.total)} "
            f"({human_bytes(state)} for weights, gradients and optimizer state, "
            f"{human_bytes(estimate.activations)} for activations), but {where} only "
            f"{human_bytes(available)}; lower train.batch_size (raise "
            "train.gradient_accumulation_steps to keep the batch), make the model smaller"
            + (
                ', shard it with train.parallelism = "fsdp" over more processes'
                if shards > 1 or config.train.parallelism == "fsdp"
                else ', shard it across processes with train.parallelism = "fsdp"'
            )
            + (
                ""
                if config.train.activation_checkpointing
                else ", recompute activations with train.activation_checkpointing = true"
            )
            + ", or skip this check with --set train.memory_check=false"
        ]
    )


def run_plan(
    config: ExperimentConfig,
    plugins: Plugins,
    accelerator: Any,
    paths: RunPaths,
    callbacks: list[Any],
    data: Any,
    data_dir: Path,
) -> Any:
    """The plan of this run on its own devices (:mod:`nanogpt_core.plan`)."""
    from nanogpt_core.plan.hardware import device_hardware
    from nanogpt_core.plan.planner import make_plan

    return make_plan(
        config,
        plugins,
        device_hardware(accelerator.num_processes, accelerator.device),
        data_dir=data_dir,
        results_dir=paths.root.parent,
        callbacks=callbacks,
        data=data,
    )


def relaunch_hint(paths: RunPaths, trainer: Any) -> tuple[int | None, str]:
    """How far a run stopped by a lost peer got, and what relaunching every node resumes from.

    :param trainer: the run's ``Trainer``, or None when it stopped before training.
    :returns: the steps done (None before training) and the hint.
    """
    command = "relaunch every node with the same command"
    if trainer is None:
        if paths.last_checkpoint.exists():
            return None, f"{command} to resume from {paths.last_checkpoint}"
        return None, f"{command} to start again"
    state = trainer.state
    if state.last_saved_step is None:
        return state.step, f"nothing was saved yet; {command} to start again"
    hint = f"{command} to resume from step {state.last_saved_step} ({paths.last_checkpoint})"
    return state.step, hint


def make_callbacks(config: ExperimentConfig, plugins: Plugins) -> list[Any]:
    """Instantiate the experiment's callbacks, checking what each factory returns."""
    from nanogpt_core.errors import PluginFault

    registry = plugins.callbacks()
    callbacks = []
    for position, spec in enumerate(config.callbacks):
        registration = registry[spec.plugin]
        try:
            callback = registration.factory(spec.options)
        except NanoGPTError:
            raise
        except Exception as exc:
            raise PluginFault(
                f"callback {spec.plugin!r} (callbacks[{position}]) failed in its factory: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        check_callback(callback, spec.plugin, registration.plugin)
        callbacks.append(callback)
    return callbacks


@contextlib.contextmanager
def run_lock(paths: RunPaths, is_main: bool) -> Iterator[None]:
    """One ``gpt run`` per results folder: the main process holds its lock throughout."""
    from nanogpt_core.locks import locked

    if not is_main:
        yield
        return
    with locked(paths.lock, wait=False, purpose=f"results folder {paths.root}"):
        yield


def run_experiment(
    config: ExperimentConfig,
    plugins: Plugins,
    *,
    results_dir: Path,
    data_dir: Path,
    fresh: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare the data if needed, check everything, then train; returns the final metrics.

    :raises PeerLost: another process of the run died or hung (exit status 75).
    """
    paths = RunPaths(Path(results_dir) / config.name)
    accelerator = make_accelerator(config.train)
    main = accelerator.is_main_process
    before = lost_peers(config.train.distributed_timeout_s, lambda: relaunch_hint(paths, None))
    with before, run_lock(paths, main):
        if not fresh:
            check_same_experiment(config, paths)
        finished = finished_summary(config, paths)
        if finished is not None and not fresh:
            if main:
                print(f"{config.name} already finished ({paths.done}); use --fresh to start over")
            return finished
        return _train(config, plugins, paths, accelerator, data_dir, fresh, progress)


def _train(
    config: ExperimentConfig,
    plugins: Plugins,
    paths: RunPaths,
    accelerator: Any,
    data_dir: Path,
    fresh: bool,
    progress: bool,
) -> dict[str, Any]:
    from nanogpt_core.data.preparation import prepare_dataset
    from nanogpt_core.train.trainer import Trainer, model_config_for

    main = accelerator.is_main_process
    # Callbacks first: one that refuses its options does so before data is prepared.
    callbacks = make_callbacks(config, plugins)
    # The main process prepares; the others then find the finished data.
    data = on_main_process(
        accelerator,
        lambda: prepare_dataset(config, plugins, data_dir=Path(data_dir)),
        others="repeat",
    )
    check_data_fits(config, data)
    plan = run_plan(config, plugins, accelerator, paths, callbacks, data, data_dir)
    check_memory(
        config,
        model_config_for(config, data),
        accelerator.device,
        accelerator.mixed_precision,
        optimizer_bytes=plan.memory.estimate.optimizer * plan.memory.shards
        if plan.memory.optimizer_measured
        else None,
        shards=plan.memory.shards,
    )
    if main:
        from nanogpt_core.plan.report import plan_summary

        print(plan_summary(plan), flush=True)
    # Only now, with everything checked, is anything on disk changed.
    if main:
        if fresh and (moved := move_aside(paths.root)):
            print(f"--fresh: moved the old results to {moved}")
        # What a killed writer of this run left behind (never a live process's).
        for folder in (paths.root, paths.checkpoints, paths.samples):
            remove_stale_temporaries(folder)
        # config.json is the trainer's to write, once a last.pth there is known to
        # belong to this experiment: a refused resume leaves the folder as it was.
    accelerator.wait_for_everyone()
    trainer = Trainer(
        config, data, callbacks, paths, accelerator, progress=progress, plugins=plugins
    )
    with lost_peers(config.train.distributed_timeout_s, lambda: relaunch_hint(paths, trainer)):
        final = trainer.fit()
    if main:
        summary = {"step": trainer.state.step, "epoch": trainer.state.epoch, **final}
        atomic_write_text(paths.done, json.dumps(summary, indent=2) + "\n")
    return final
