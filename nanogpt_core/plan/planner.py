"""Gathering a plan: :func:`make_plan` reads what the figures need, trains nothing.

The experiment's data folder and fingerprint come from the same code that
prepares it (:func:`nanogpt_core.data.preparation.locate_data`): an up-to-date
preparation gives exact counts, otherwise the dataset plugin's estimate is
asked (:func:`nanogpt_core.data.token_estimates.estimate_tokens`). The model is
built on torch's ``meta`` device (shapes, no storage) to count its parameters
and FLOPs, and the optimizer plugin's own optimizer is built and stepped there
to measure its state. Nothing is downloaded and nothing is written.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nanogpt_core.files import existing_ancestor, free_bytes
from nanogpt_core.plan.figures import (
    CUDA_RESERVE,
    DataFigures,
    DiskFigures,
    MemoryFigures,
    ModelFigures,
    RunPlan,
    TimeFigures,
    allreduce_seconds,
    fine_tuning_batches,
    steps_of,
    training_seconds,
)
from nanogpt_core.plan.hardware import Hardware, hardware_precision, interconnect_bandwidth

if TYPE_CHECKING:
    from nanogpt_core.config.experiment import ExperimentConfig
    from nanogpt_core.data.prepared import PreparedData
    from nanogpt_core.plugins.registry import Plugins

# A vocabulary learned from the data (the char tokenizer's) is unknown until
# the data is prepared: the plan assumes one byte's worth.
STAND_IN_VOCAB = 256
# How many of a previous run's last MFU readings its median is taken over.
MFU_READINGS = 20


def make_plan(
    config: ExperimentConfig,
    plugins: Plugins,
    hardware: Hardware,
    *,
    data_dir: Path,
    results_dir: Path,
    callbacks: Sequence[Any] = (),
    interconnect: str | None = None,
    mfu: float | None = None,
    data: PreparedData | None = None,
) -> RunPlan:
    """The plan of ``config`` on ``hardware``.

    :param callbacks: the experiment's callbacks, made (those with a
        ``planned_checkpoints(epochs)`` method say how many checkpoint files
        they keep besides ``last.pth``).
    :param interconnect: ``"nvlink"``, ``"pcie"`` or ``"infiniband"``; default
        by the hardware (:func:`nanogpt_core.plan.hardware.interconnect_bandwidth`).
    :param mfu: the MFU to assume; default a previous run's, else the GPU table's.
    :param data: the prepared data, when the caller has it (``gpt run``).
    :raises ConfigError: the experiment's precision does not run on ``hardware``.
    """
    from nanogpt_core.data.preparation import current_preparation, locate_data

    precision = hardware_precision(config.train.mixed_precision, hardware)
    location = locate_data(config, plugins, data_dir=Path(data_dir))
    if data is None:
        data = current_preparation(location)
    estimate = None if data is not None else _token_estimate(location)
    vocab, vocab_known = _vocabulary(config, data, location)
    shape = config.model.shape(vocab)
    model = _model_figures(shape, vocab_known)
    optimizer_bytes = _optimizer_bytes(config, plugins, shape)
    data_figures = _data_figures(config, hardware, data, estimate, location, vocab)
    results = Path(results_dir) / config.name
    return RunPlan(
        experiment=config.name,
        hardware=hardware,
        model=model,
        data=data_figures,
        memory=_memory_figures(config, hardware, shape, precision, optimizer_bytes),
        time=_time_figures(
            config, hardware, precision, model, data_figures, results, mfu, interconnect
        ),
        disk=_disk_figures(
            location.folder,
            data,
            data_figures,
            model,
            optimizer_bytes,
            results,
            callbacks,
            config.train.epochs,
            hardware.count,
        ),
    )


def _token_estimate(location: Any) -> dict[str, int] | None:
    from nanogpt_core.data.token_estimates import estimate_tokens

    return estimate_tokens(location.source, location.tokenizer.name)


def _vocabulary(
    config: ExperimentConfig, data: PreparedData | None, location: Any
) -> tuple[int, bool]:
    """The model's vocabulary: the experiment's, else the data's or the tokenizer's, padded.

    The padding is the run's (:func:`nanogpt_core.train.model_setup.model_config_for`).
    """
    from nanogpt_core.data.plugins import make_tokenizer
    from nanogpt_core.train.model_setup import padded_vocab_size

    if config.model.vocab_size is not None:
        return config.model.vocab_size, True
    if data is not None:
        return padded_vocab_size(data.vocab_size), True
    vocab = getattr(make_tokenizer(location.tokenizer), "vocab_size", 0)
    if isinstance(vocab, int) and vocab > 0:
        return padded_vocab_size(vocab), True
    return padded_vocab_size(STAND_IN_VOCAB), False


def _model_figures(shape: Any, vocab_known: bool) -> ModelFigures:
    from nanogpt_core.train.memory import extend_over_layers, meta_model, parameter_count

    # The embeddings do not depend on the depth: one block's model has them all.
    model = meta_model(attrs.evolve(shape, n_layer=1))
    embedding = sum(
        module.weight.numel()
        for name, module in model.transformer.items()
        if name in ("wte", "wpe")
    )
    flops = extend_over_layers(shape, lambda config: meta_model(config).flops_per_token())
    return ModelFigures(
        parameters=parameter_count(shape),
        embedding=embedding,
        flops_per_token=flops,
        vocab_size=shape.vocab_size,
        vocab_known=vocab_known,
    )


def _optimizer_bytes(config: ExperimentConfig, plugins: Plugins, shape: Any) -> int | None:
    """The optimizer plugin's state for this shape, measured on ``meta``; None if it cannot be."""
    from nanogpt_core.train.memory import optimizer_state_bytes
    from nanogpt_core.train.optimization import make_optimizer

    try:
        return optimizer_state_bytes(
            shape, lambda model: make_optimizer(plugins, config.train, model, "meta")
        )
    except Exception:  # a plugin that cannot build on meta: AdamW's state is assumed
        return None


def _data_figures(
    config: ExperimentConfig,
    hardware: Hardware,
    data: PreparedData | None,
    estimate: dict[str, int] | None,
    location: Any,
    vocab: int,
) -> DataFigures:
    from nanogpt_core.data.prepared import token_dtype

    train = config.train
    fine_tuning = location.examples is not None
    counts: dict[str, int | None] = {"train": None, "val": None, "train_examples": None}
    if data is not None:
        source = "prepared"
        counts.update(train=data.tokens("train"), val=data.tokens("val"))
        counts["train_examples"] = data.meta["splits"]["train"].get("examples")
        dtype_bytes = data.dtype.itemsize
    else:
        source = "estimated" if estimate else "unknown"
        counts.update({key: (estimate or {}).get(key) for key in counts})
        dtype_bytes = 2 if token_dtype(vocab) == "uint16" else 4
    per_step = train.batch_size * train.gradient_accumulation_steps * hardware.count
    if not fine_tuning:
        return DataFigures(
            fine_tuning=False,
            steps=steps_of(train.epochs, train.steps_per_epoch, None),
            tokens_per_step=per_step * config.model.block_size,
            train_tokens=counts["train"],
            val_tokens=counts["val"],
            source=source,
            dtype_bytes=dtype_bytes,
        )
    examples, tokens = counts["train_examples"], counts["train"]
    batches = None
    tokens_per_step = None
    if examples and tokens is not None:
        batches = fine_tuning_batches(
            examples, train.batch_size, hardware.count, train.gradient_accumulation_steps
        )
        tokens_per_step = per_step * tokens / examples  # at the examples' mean length
    return DataFigures(
        fine_tuning=True,
        steps=steps_of(train.epochs, train.steps_per_epoch, batches),
        tokens_per_step=tokens_per_step,
        train_tokens=tokens,
        val_tokens=counts["val"],
        source=source,
        dtype_bytes=dtype_bytes,
    )


def _memory_figures(
    config: ExperimentConfig,
    hardware: Hardware,
    shape: Any,
    precision: str,
    optimizer_bytes: int | None,
) -> MemoryFigures:
    from nanogpt_core.train.memory import estimate_training_memory, shards_for

    shards = shards_for(config.train, hardware.count)
    estimate = estimate_training_memory(
        shape,
        batch_size=config.train.batch_size,
        precision=precision,
        optimizer_bytes=optimizer_bytes,
        activation_checkpointing=config.train.activation_checkpointing,
        shards=shards,
    )
    return MemoryFigures(
        estimate=estimate,
        precision=precision,
        optimizer_measured=optimizer_bytes is not None,
        device_memory=hardware.memory,
        reserve=CUDA_RESERVE if hardware.cuda else 0,
        parallelism=config.train.parallelism,
        shards=shards,
    )


def measured_mfu(results: Path) -> float | None:
    """The median MFU of the last readings a previous run wrote to ``metrics.jsonl``."""
    readings = []
    try:
        with open(results / "metrics.jsonl", encoding="utf-8") as lines:
            for line in lines:
                try:
                    value = json.loads(line).get("mfu")
                except (json.JSONDecodeError, AttributeError):
                    continue  # a line cut by a kill, or not an object
                if isinstance(value, (int, float)) and value > 0:
                    readings.append(float(value))
    except (OSError, UnicodeDecodeError):
        return None
    return statistics.median(readings[-MFU_READINGS:]) if readings else None


def _time_figures(
    config: ExperimentConfig,
    hardware: Hardware,
    precision: str,
    model: ModelFigures,
    data: DataFigures,
    results: Path,
    mfu: float | None,
    interconnect: str | None,
) -> TimeFigures:
    gpu = hardware.gpu
    peak = config.train.peak_flops
    if peak is None and gpu is not None and precision in ("bf16", "fp16"):
        peak = gpu.peak
    source = "--mfu"
    if mfu is None and (mfu := measured_mfu(results)) is not None:
        source = f"measured by the run in {results}"
    if mfu is None and gpu is not None:
        mfu, source = gpu.mfu, f"the GPU table's for {gpu.name}"
    seconds = None
    if peak and mfu and data.training_tokens is not None:
        flops = model.flops_per_token * data.training_tokens
        seconds = training_seconds(flops, hardware.count, peak, mfu)
    link = interconnect_bandwidth(hardware, interconnect)
    allreduce = None
    if link is not None:
        allreduce = allreduce_seconds(4 * model.parameters, hardware.count, link[1])
    return TimeFigures(
        peak=peak,
        mfu=mfu,
        mfu_source=source if mfu is not None else "unknown",
        seconds=seconds,
        interconnect=link[0] if link else None,
        allreduce_seconds=allreduce,
    )


def _disk_figures(
    data_folder: Path,
    data: PreparedData | None,
    figures: DataFigures,
    model: ModelFigures,
    optimizer_bytes: int | None,
    results: Path,
    callbacks: Sequence[Any],
    epochs: int,
    processes: int,
) -> DiskFigures:
    from nanogpt_core.train.memory import ADAMW_BYTES_PER_PARAMETER, checkpoint_bytes

    if data is not None:
        data_bytes: int | None = sum(
            path.stat().st_size for path in data.folder.iterdir() if path.is_file()
        )
    elif figures.train_tokens is not None:
        data_bytes = (figures.train_tokens + (figures.val_tokens or 0)) * figures.dtype_bytes
    else:
        data_bytes = None
    if optimizer_bytes is None:
        optimizer_bytes = ADAMW_BYTES_PER_PARAMETER * model.parameters
    kept = 1 + sum(_planned_checkpoints(callback, epochs) for callback in callbacks)
    data_at, results_at = existing_ancestor(data_folder), existing_ancestor(results)
    return DiskFigures(
        data_folder=data_folder,
        data_bytes=data_bytes,
        data_prepared=data is not None,
        checkpoint_bytes=checkpoint_bytes(model.parameters, optimizer_bytes, processes),
        checkpoints_kept=kept,
        results_folder=results,
        data_free=free_bytes(data_folder),
        results_free=free_bytes(results),
        same_filesystem=os.stat(data_at).st_dev == os.stat(results_at).st_dev,
    )


def _planned_checkpoints(callback: Any, epochs: int) -> int:
    """Checkpoint files a callback keeps besides ``last.pth`` (its optional method)."""
    from nanogpt_core.errors import PluginFault

    planned = getattr(callback, "planned_checkpoints", None)
    if planned is None:  # a callback that does not subclass Callback
        return 0
    try:
        count = planned(epochs)
    except Exception as exc:
        raise PluginFault(
            f"callback {type(callback).__name__} failed in planned_checkpoints: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if type(count) is not int or count < 0:
        raise PluginFault(
            f"callback {type(callback).__name__}: planned_checkpoints returned {count!r}, "
            "not a count (an integer, 0 or more)"
        )
    return count
