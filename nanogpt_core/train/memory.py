"""Will the model fit? Estimating memory before anything is allocated.

Building a model that cannot fit ends, at best, in a ``CUDA out of memory``
traceback minutes into a run and, at worst, in the machine swapping itself to a
standstill. What a run needs follows from the model's shape and its micro-batch,
so the core estimates it first and refuses with the estimate.
:func:`estimate_training_memory` is the project's one estimate: the run's
memory check uses it, and whatever else sizes a run (sharding, planning) must
use it too, so that they never disagree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs


def extend_over_layers(config: Any, measure: Callable[[Any], int]) -> int:
    """``measure(config)``, taken at one block and at two and extended to ``n_layer``.

    Every transformer block of our GPT has the same shape, so a count over the
    model (parameters, FLOPs, optimizer state) is affine in ``n_layer``; building
    thousands of blocks, even on ``meta``, takes minutes, and a model too big to
    train is exactly where an estimate is asked for.
    """
    if config.n_layer <= 2:
        return measure(config)
    one = measure(attrs.evolve(config, n_layer=1))
    two = measure(attrs.evolve(config, n_layer=2))
    return one + (config.n_layer - 1) * (two - one)


def meta_model(config: Any) -> Any:
    """Our GPT of this shape on torch's ``meta`` device: shapes, no storage, no memory."""
    import torch

    from nanogpt_core.model.gpt import GPT

    with torch.device("meta"):
        return GPT(config)


def parameter_count(config: Any) -> int:
    """Parameters of our GPT of this shape (a ``GPTConfig``), without allocating it.

    The model is built on torch's ``meta`` device, where tensors have shapes
    but no storage: the count is ``GPT.num_params``'s by construction (every
    architecture option counts, a tied output layer once) and a new model
    option needs nothing here.
    """
    return extend_over_layers(config, lambda shape: meta_model(shape).num_params())


def unit_parameter_counts(config: Any) -> tuple[int, int]:
    """Parameters of FSDP's root unit (all but the blocks: embeddings, last norm, an untied head) and of one block.

    Built on the ``meta`` device, as :func:`parameter_count`.
    """
    model = meta_model(attrs.evolve(config, n_layer=1))
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    return model.num_params() - block, block


def optimizer_state_bytes(config: Any, build: Callable[[Any], Any]) -> int:
    """Bytes of the state an optimizer keeps for a model of this shape, after one step.

    ``build(model)`` is the optimizer plugin's own ``build`` (see
    :func:`nanogpt_core.train.optimization.make_optimizer`): the model is made
    on the ``meta`` device, given zero gradients and stepped once, and the
    tensors in the optimizer's state are counted. So every plugin is asked what
    it really keeps (AdamW two float32 moments per parameter, Muon one momentum
    buffer on its matrices and AdamW's on the rest) without allocating any of it.
    Whatever the plugin raises propagates: the caller decides what to assume.
    Measured at one block and two and extended (:func:`extend_over_layers`):
    exact for any optimizer whose state is kept per parameter.
    """
    return extend_over_layers(config, lambda shape: _measured_state_bytes(shape, build))


def _measured_state_bytes(config: Any, build: Callable[[Any], Any]) -> int:
    """The state of ``build``'s optimizer for this exact shape, after one meta step."""
    import torch

    model = meta_model(config)
    with torch.device("meta"):
        optimizer = build(model)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


# Bytes per token that one transformer block keeps for the backward pass, as
# coefficients of C (n_embd) and H (the MLP's width), measured with
# torch.autograd.graph.saved_tensors_hooks on our GPT (tests/core/train/test_memory.py
# checks them). In float32: the residual and the norm outputs, q, k and v, the
# attention output (32 C), and the MLP's hidden activations (8 H: GELU's input
# and output; SwiGLU keeps four H-wide tensors, 16 H). Under 16-bit autocast the
# matrix inputs and outputs are half as large while the residual stream and the
# norms stay in float32 (20 C + 4 H; SwiGLU 8 H).
_BLOCK = {"fp32": (32, 8, 16), "16-bit": (20, 4, 8)}
# What each option adds per block, in C: RoPE's rotated queries and keys, RMSNorm
# computed in float32 (its inputs and statistics), qk-norm's normalised heads.
_OPTION_EXTRA = {
    "fp32": {"rope": 8, "rmsnorm": 8, "qk_norm": 20},
    "16-bit": {"rope": 4, "rmsnorm": 8, "qk_norm": 22},
}


@attrs.frozen
class MemoryEstimate:
    """Bytes one training process needs: the project's one memory estimate.

    ``weights``, ``gradients`` and ``optimizer`` are this process's share: the
    whole model's under data parallelism, a ``1/shards`` share when the
    parameters are sharded. ``activations`` is the peak of one micro-batch's
    forward and backward pass, including what the backward pass holds at once
    and, under mixed precision, autocast's half-precision copies of the weights.
    """

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        """Everything at once, at the peak of a micro-step."""
        return self.weights + self.gradients + self.optimizer + self.activations


def activation_bytes(
    config: Any, batch_size: int, precision: str, *, checkpointed: bool = False
) -> int:
    """Peak activation memory of one micro-batch of ``batch_size`` full-length sequences.

    :param config: the model's shape (a ``GPTConfig``).
    :param precision: ``"no"`` (float32), ``"bf16"`` or ``"fp16"`` autocast.
    :param checkpointed: activation checkpointing: each block keeps only its
        float32 input (4 C), and one block's tensors live while it is recomputed.

    Per token: every block's saved tensors (:data:`_BLOCK`), the output layer's
    (the log-softmax of the logits is kept in float32, 4 V), and the largest
    working set of the backward pass (the logits' gradient and its float32
    copy, 8 V, or one block's float32 tensors). Dropout's masks and attention
    probabilities are not counted: pre-training runs without dropout.
    """
    from nanogpt_core.model.config import mlp_hidden_size

    kind = "fp32" if precision == "no" else "16-bit"
    c, h, v = config.n_embd, mlp_hidden_size(config), config.vocab_size
    per_c, per_h, per_h_swiglu = _BLOCK[kind]
    block = per_c * c + (per_h_swiglu if config.mlp == "swiglu" else per_h) * h
    extra = _OPTION_EXTRA[kind]
    block += c * (
        (extra["rope"] if config.position == "rope" else 0)
        + (extra["rmsnorm"] if config.norm == "rmsnorm" else 0)
        + (extra["qk_norm"] if config.qk_norm else 0)
    )
    head = 8 * c + 4 * v
    backward = max(8 * v, _BLOCK["fp32"][0] * c + _BLOCK["fp32"][1] * h)
    tokens = batch_size * config.block_size
    blocks = config.n_layer * 4 * c + block if checkpointed else config.n_layer * block
    return tokens * (blocks + head + backward)


# AdamW's two float32 moments per parameter: what is assumed of an optimizer
# whose state cannot be measured (optimizer_state_bytes).
ADAMW_BYTES_PER_PARAMETER = 8


def estimate_training_memory(
    config: Any,
    *,
    batch_size: int,
    precision: str,
    optimizer_bytes: int | None = None,
    shards: int = 1,
    activation_checkpointing: bool = False,
) -> MemoryEstimate:
    """What a training process of this model and micro-batch needs (see :class:`MemoryEstimate`).

    :param optimizer_bytes: the whole model's optimizer state
        (:func:`optimizer_state_bytes`); default AdamW's 8 bytes per parameter.
    :param shards: processes the parameters, gradients and optimizer state are
        sharded over (1: data parallelism, every process holds them all). A
        sharded process also holds whole, in float32, what FSDP gathers: the
        root unit (embeddings and the rest outside the blocks, kept gathered
        from the forward to the backward pass) and two blocks (the one running
        and the next, prefetched); that is counted in ``weights``.
    :param activation_checkpointing: ``[train] activation_checkpointing``.
    """
    count = parameter_count(config)
    gathered = 0
    if shards > 1:
        root, block = unit_parameter_counts(config)
        gathered = 4 * (root + 2 * block)
    if optimizer_bytes is None:
        optimizer_bytes = ADAMW_BYTES_PER_PARAMETER * count
    activations = activation_bytes(
        config, batch_size, precision, checkpointed=activation_checkpointing
    )
    if precision != "no":
        activations += 2 * count  # autocast's 16-bit copies of the weights
    return MemoryEstimate(
        parameters=count,
        weights=-(-4 * count // shards) + gathered,
        gradients=-(-4 * count // shards),
        optimizer=-(-optimizer_bytes // shards),
        activations=activations,
    )


def shards_for(train: Any, processes: int) -> int:
    """Processes a run's parameters, gradients and optimizer state are sharded over.

    ``processes`` under ``[train] parallelism = "fsdp"``; 1 under ``"ddp"``,
    where every process holds them all.
    """
    return processes if train.parallelism == "fsdp" else 1


# A checkpoint's bytes besides the tensors: the pickled experiment, counters and
# metrics, and torch's zip records (about 24 KiB for our models), plus each
# process's random-number states (about 15 KiB: torch's CPU generator is 5 KiB).
CHECKPOINT_OVERHEAD = 24 * 1024
RANDOM_STATES_BYTES = 16 * 1024


def checkpoint_bytes(parameters: int, optimizer_bytes: int, processes: int = 1) -> int:
    """The size of a checkpoint file: float32 weights, the optimizer's state and a little more.

    A tied output layer is stored once (it shares the embedding's storage).
    """
    return 4 * parameters + optimizer_bytes + CHECKPOINT_OVERHEAD + RANDOM_STATES_BYTES * processes


def available_bytes(device: Any) -> tuple[int | None, str]:
    """Memory a training run on ``device`` can still take, and words for it in messages.

    On a GPU that is the *free* memory: another process (a second run, a
    notebook, another rank's CUDA context) may hold part of the total.
    """
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"{torch.cuda.get_device_name(device)} has free"
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "this machine has available"
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None, "unknown"
    return int(pages), "this machine has available"


def human_bytes(n: float) -> str:
    """``1.5 GiB`` and the like."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
