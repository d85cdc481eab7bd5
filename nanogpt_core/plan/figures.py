"""The figures of a plan, section by section: model, data, memory, time, disk.

Each section is a small frozen attrs class holding what was counted or
estimated, with properties for what follows from it. Nothing here imports
torch or reads files: :mod:`nanogpt_core.plan.planner` gathers the inputs,
:mod:`nanogpt_core.plan.report` prints them.
"""

from __future__ import annotations

import math
from pathlib import Path

import attrs

from nanogpt_core.plan.hardware import Hardware
from nanogpt_core.train.memory import MemoryEstimate

# Repeating data beyond about four passes stops being nearly as good as new data:
# Muennighoff et al., "Scaling Data-Constrained Language Models" (NeurIPS 2023).
MAX_USEFUL_PASSES = 4.0
# What a GPU loses to the CUDA context and the caching allocator's fragmentation
# before a run's tensors: counted against its memory when a plan checks the fit.
CUDA_RESERVE = 1024**3


@attrs.frozen
class ModelFigures:
    """The model's size and training cost.

    Attributes:
        parameters: every parameter, a tied output layer once (``GPT.num_params``).
        embedding: the token and position embeddings' parameters.
        flops_per_token: training FLOPs per token (forward and backward), as the
            run's MFU counts them (``GPT.flops_per_token``: 6N plus attention).
        vocab_size: the vocabulary the shape was built with.
        vocab_known: False when the tokenizer learns its vocabulary from the
            data and nothing is prepared yet (a stand-in of 256 was used).
    """

    parameters: int
    embedding: int
    flops_per_token: int
    vocab_size: int
    vocab_known: bool = True

    @property
    def non_embedding(self) -> int:
        """Parameters other than the embeddings (Kaplan et al.'s N)."""
        return self.parameters - self.embedding


@attrs.frozen
class DataFigures:
    """What the run trains on, and how often it sees each token.

    Attributes:
        fine_tuning: the data is instruction-tuning examples (padded batches).
        steps: optimizer steps of the whole run.
        tokens_per_step: tokens of one optimizer step, all processes together
            (fine-tuning: the average, from the examples' mean length).
        train_tokens: unique tokens in the train split, or None when unknown.
        val_tokens: the same for the validation split.
        source: ``"prepared"`` (counted in ``meta.json``), ``"estimated"`` (the
            dataset plugin's estimate) or ``"unknown"``.
        dtype_bytes: bytes per stored token (2 for uint16, 4 for uint32).
    """

    fine_tuning: bool
    steps: int
    tokens_per_step: float | None
    train_tokens: int | None
    val_tokens: int | None
    source: str
    dtype_bytes: int = 2

    @property
    def training_tokens(self) -> int | None:
        """Tokens the run trains on, all steps and processes together."""
        if self.tokens_per_step is None:
            return None
        return round(self.steps * self.tokens_per_step)

    @property
    def passes(self) -> float | None:
        """How many times the run goes over its train split."""
        if self.training_tokens is None or not self.train_tokens:
            return None
        return self.training_tokens / self.train_tokens


@attrs.frozen
class MemoryFigures:
    """Memory per process, and whether it fits the device.

    Attributes:
        estimate: the project's one estimate (:mod:`nanogpt_core.train.memory`).
        precision: the autocast precision it assumes (``"no"``, ``"bf16"``, ``"fp16"``).
        optimizer_measured: whether the optimizer's state was measured by
            building the optimizer plugin's own optimizer on the meta device
            (False: AdamW's 8 bytes per parameter were assumed).
        device_memory: bytes a process may use, or None when unknown.
        reserve: what the device keeps for itself (CUDA context, fragmentation).
        parallelism: ``[train] parallelism`` (``"ddp"`` or ``"fsdp"``).
        shards: processes the weights, gradients and optimizer state are
            sharded over (1 under DDP).
    """

    estimate: MemoryEstimate
    precision: str
    optimizer_measured: bool
    device_memory: int | None
    reserve: int = 0
    parallelism: str = "ddp"
    shards: int = 1

    @property
    def fits(self) -> bool | None:
        """Whether the estimate fits the device (None when its memory is unknown)."""
        if self.device_memory is None:
            return None
        return self.estimate.total + self.reserve <= self.device_memory


@attrs.frozen
class TimeFigures:
    """Wall time at an assumed MFU, and the gradient all-reduce per step.

    Attributes:
        peak: one device's dense tensor-core FLOP/s at the run's precision, or None.
        mfu: the model FLOPs utilisation assumed, or None.
        mfu_source: where ``mfu`` comes from (the GPU table, ``--mfu``, a previous run).
        seconds: training time of the whole run, or None without a peak and an MFU.
        interconnect: the link gradients are all-reduced over, or None.
        allreduce_seconds: one optimizer step's gradient all-reduce (ring
            algorithm, float32 gradients), or None.
    """

    peak: float | None
    mfu: float | None
    mfu_source: str
    seconds: float | None
    interconnect: str | None = None
    allreduce_seconds: float | None = None


@attrs.frozen
class DiskFigures:
    """The disk the data and the checkpoints fill, and the room there is.

    Attributes:
        data_folder: where the prepared data is (or will be).
        data_bytes: its size (``train.bin`` and ``val.bin``, plus the example
            index of fine-tuning data), or None when unknown.
        data_prepared: whether ``data_bytes`` was read from the files themselves.
        checkpoint_bytes: one checkpoint: float32 weights and the optimizer's state.
        checkpoints_kept: checkpoint files at the end of the run (``last.pth``
            and those callbacks keep, such as ``checkpoint``'s epoch files).
        results_folder: the run's results folder.
        data_free, results_free: free bytes on those folders' file systems.
        same_filesystem: whether both folders are on one file system.
    """

    data_folder: Path
    data_bytes: int | None
    data_prepared: bool
    checkpoint_bytes: int
    checkpoints_kept: int
    results_folder: Path
    data_free: int | None
    results_free: int | None
    same_filesystem: bool

    @property
    def checkpoints_bytes(self) -> int:
        """Every checkpoint kept at the end."""
        return self.checkpoint_bytes * self.checkpoints_kept

    def shortfall(self) -> list[str]:
        """What does not fit: ``["data", "checkpoints"]``, a subset, or nothing."""
        data = 0 if self.data_prepared or self.data_bytes is None else self.data_bytes
        # A checkpoint is written beside the old one before it replaces it.
        checkpoints = self.checkpoints_bytes + self.checkpoint_bytes
        if self.same_filesystem and self.data_free is not None:
            return ["data", "checkpoints"] if data + checkpoints > self.data_free else []
        short = []
        if self.data_free is not None and data > self.data_free:
            short.append("data")
        if self.results_free is not None and checkpoints > self.results_free:
            short.append("checkpoints")
        return short


@attrs.frozen
class RunPlan:
    """Everything ``gpt plan`` prints for one experiment on one set of devices."""

    experiment: str
    hardware: Hardware
    model: ModelFigures
    data: DataFigures
    memory: MemoryFigures
    time: TimeFigures
    disk: DiskFigures

    def warnings(self) -> list[str]:
        """One line per thing the user should change before running."""
        found = []
        passes = self.data.passes
        if passes is not None and passes > MAX_USEFUL_PASSES and not self.data.fine_tuning:
            found.append(
                f"data: {passes:.1f} passes over the train split; repeated data is nearly as "
                f"good as new only up to about {MAX_USEFUL_PASSES:.0f} passes (Muennighoff et "
                "al., 2023, Scaling Data-Constrained Language Models): use more data or fewer steps"
            )
        if self.memory.fits is False:
            found.append(
                f"memory: does not fit {self.hardware.name}; lower train.batch_size (raise "
                "train.gradient_accumulation_steps to keep the batch) or make the model smaller"
            )
        short = self.disk.shortfall()
        if short:
            found.append(
                f"disk: the {' and the '.join(short)} will not fit the free space; free some, or "
                "choose other --data-dir/--results-dir folders"
            )
        if self.model.vocab_known is False:
            found.append(
                "model: the tokenizer learns its vocabulary when the data is prepared; 256 "
                "tokens assumed (prepare the data for exact figures)"
            )
        return found


def steps_of(epochs: int, steps_per_epoch: int | None, batches_per_epoch: int | None) -> int:
    """Optimizer steps of the run, by the trainer's rule (:mod:`nanogpt_core.train.training_data`)."""
    from nanogpt_core.train.training_data import DEFAULT_STEPS_PER_EPOCH

    if steps_per_epoch is None:
        steps_per_epoch = batches_per_epoch or DEFAULT_STEPS_PER_EPOCH
    return epochs * steps_per_epoch


def allreduce_seconds(gradient_bytes: int, processes: int, bandwidth: float) -> float:
    """One ring all-reduce of ``gradient_bytes`` over ``processes`` at a bus bandwidth.

    NCCL's bus bandwidth is defined so that the time is ``2 (n - 1) / n`` times
    the bytes over it: every process sends and receives that share.
    """
    return 2 * (processes - 1) / processes * gradient_bytes / bandwidth


def training_seconds(flops: float, devices: int, peak: float, mfu: float) -> float:
    """Time to do ``flops`` on ``devices`` each reaching ``mfu`` of ``peak``."""
    return flops / (devices * peak * mfu)


def fine_tuning_batches(examples: int, batch_size: int, processes: int, accumulation: int) -> int:
    """Optimizer steps in one pass over ``examples`` (the example sampler's count)."""
    return max(1, math.ceil(math.ceil(examples / (batch_size * processes)) / accumulation))
