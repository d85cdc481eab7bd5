"""The batches a run trains on, and how many optimizer steps make an epoch of them.

Pre-training data is one long stream of tokens: each process samples random
windows of it with a seed of its own. Fine-tuning data is whole examples,
padded into batches (grouped by length) that the processes share out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from nanogpt_core.data.example_batches import ExampleBatches
from nanogpt_core.data.token_windows import BatchSource, MemmapSampler

if TYPE_CHECKING:
    from nanogpt_core.config.experiment import ExperimentConfig, TrainConfig
    from nanogpt_core.data.prepared import PreparedData
    from nanogpt_core.model.gpt import GPTConfig

# Optimizer steps per epoch of pre-training data when the experiment leaves it out.
DEFAULT_STEPS_PER_EPOCH = 1000


def steps_per_epoch(train: TrainConfig, source: Any) -> int:
    """``train.steps_per_epoch``, or what the data gives when the experiment leaves it out.

    Fine-tuning data: one pass over the examples (``batches_per_epoch`` batches,
    ``gradient_accumulation_steps`` per optimizer step). Pre-training windows
    are random, so an epoch is a fixed number of steps.
    """
    if train.steps_per_epoch is not None:
        return train.steps_per_epoch
    batches = getattr(source, "batches_per_epoch", None)
    if batches is None:
        return DEFAULT_STEPS_PER_EPOCH
    return max(1, math.ceil(batches / train.gradient_accumulation_steps))


def training_batches(
    config: ExperimentConfig,
    data: PreparedData,
    model_config: GPTConfig,
    accelerator: Any,
    *,
    fine_tuning: bool,
) -> BatchSource:
    """This process's training batches: whole examples, or random windows of the tokens.

    For pre-training data the validation split is opened (and checked) once
    too; evaluation draws its own fixed batches from it.
    """
    train = config.train
    if fine_tuning:
        eot = data.tokenizer.get("eot_id")
        return ExampleBatches(
            data.split_path("train"),
            data.dtype,
            data.examples("train"),
            train.batch_size,
            seed=config.seed,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            pad_id=eot if isinstance(eot, int) else 0,
            group_by_length=train.group_by_length,
        )

    def sampler(split: str, seed: int) -> MemmapSampler:
        return MemmapSampler(
            data.split_path(split),
            data.dtype,
            model_config.block_size,
            train.batch_size,
            seed=seed,
            vocab_size=model_config.vocab_size,
        )

    windows = sampler("train", config.seed + accelerator.process_index)
    sampler("val", 0)  # checks val once
    return windows


def to_device(
    x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the training device; on CUDA through pinned memory, so the copy is async."""
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
