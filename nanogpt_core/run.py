"""Running an experiment end to end: device, data, callbacks, trainer.

This is what ``gpt run`` calls once the experiment file has been read and
checked. It is also what every process runs under ``accelerate launch``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from nanogpt_core.callbacks import RunPaths
from nanogpt_core.config import ExperimentConfig, TrainConfig
from nanogpt_core.errors import NanoGPTError
from nanogpt_core.files import atomic_write_text
from nanogpt_core.plugins import Plugins


def make_accelerator(train: TrainConfig) -> Any:
    """An ``Accelerator`` for ``[train]``, refusing precisions the hardware lacks."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    has_cuda = torch.cuda.is_available()
    if train.device == "cuda" and not has_cuda:
        raise NanoGPTError(
            'train.device = "cuda" but no CUDA device is available; use "auto" or "cpu"'
        )
    cpu = train.device == "cpu" or not has_cuda
    if train.mixed_precision == "fp16" and cpu:
        raise NanoGPTError(
            'train.mixed_precision = "fp16" needs a GPU; use "bf16" or "no" on the CPU'
        )
    if train.mixed_precision == "bf16" and not cpu and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise NanoGPTError(
            f'train.mixed_precision = "bf16" is not supported on {name}; use "fp16" (with loss scaling)'
        )
    # One process may run several experiments (tests, notebooks): forget the last
    # one's precision settings. The distributed set-up (PartialState) is kept.
    AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        cpu=cpu,
    )


def move_aside(root: Path) -> Path | None:
    """Rename an old results folder to ``<name>.old-<time>`` so nothing is deleted."""
    if not root.exists():
        return None
    target = root.with_name(f"{root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while target.exists():
        target = root.with_name(f"{root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
        suffix += 1
    root.rename(target)
    return target


def finished_summary(config: ExperimentConfig, paths: RunPaths) -> dict[str, Any] | None:
    """The final metrics of a run that already did all of this experiment's steps, else None.

    A ``done`` run whose experiment now asks for more steps is not finished: it
    resumes from its checkpoint.
    """
    try:
        summary = json.loads(paths.done.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    total = config.train.epochs * config.train.steps_per_epoch
    return summary if summary.get("step", 0) >= total else None


def run_experiment(
    config: ExperimentConfig,
    plugins: Plugins,
    *,
    results_dir: Path,
    data_dir: Path,
    fresh: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Prepare the data if needed, then train; returns the final metrics."""
    from nanogpt_core.datasets import prepare_dataset
    from nanogpt_core.trainer import Trainer

    paths = RunPaths(Path(results_dir) / config.name)
    accelerator = make_accelerator(config.train)
    finished = finished_summary(config, paths)
    if finished is not None and not fresh:
        if accelerator.is_main_process:
            print(f"{config.name} already finished ({paths.done}); use --fresh to start over")
        return finished
    if fresh and accelerator.is_main_process:
        moved = move_aside(paths.root)
        if moved:
            print(f"--fresh: moved the old results to {moved}")
    accelerator.wait_for_everyone()
    # The main process prepares; the others then find the finished data.
    with accelerator.main_process_first():
        data = prepare_dataset(config, plugins, data_dir=Path(data_dir))
    registry = plugins.callbacks()
    callbacks = [registry[spec.plugin].factory(spec.options) for spec in config.callbacks]
    if accelerator.is_main_process:
        atomic_write_text(paths.config, json.dumps(config.to_dict(), indent=2) + "\n")
    trainer = Trainer(config, data, callbacks, paths, accelerator, progress=progress)
    final = trainer.fit()
    if accelerator.is_main_process:
        summary = {"step": trainer.state.step, "epoch": trainer.state.epoch, **final}
        atomic_write_text(paths.done, json.dumps(summary, indent=2) + "\n")
    return final
