"""``[train] parallelism = "fsdp"``: the model sharded with PyTorch's FSDP2 across processes.

Accelerate still launches the processes, picks their devices and runs mixed
precision (autocast, and the fp16 loss scaler through the optimizer it
prepares), but it does not shard: its FSDP plugin is ignored on a machine
without CUDA, and ``accelerator.prepare`` would wrap an already sharded model
in DDP on the CPU. So the model is sharded here with torch's own
``fully_shard`` (one unit per transformer block, then the root), on the
process group Accelerate set up, on CPUs and GPUs alike: the path the CPU tests
run is the path a GPU takes. Every parameter becomes a ``DTensor`` holding
this process's rows; the optimizer, built afterwards, keeps state for those
rows only.

With one process there is nothing to shard across: the model stays whole
(``is_sharded`` is false) and only the checkpoint layout is the sharded one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from nanogpt_core.train.optimization import prepare_contained

FSDP = "fsdp"


def is_sharded(train: Any, accelerator: Any) -> bool:
    """Whether this run shards its model: ``parallelism = "fsdp"`` over more than one process."""
    return train.parallelism == FSDP and accelerator.num_processes > 1


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Apply ``fully_shard`` to each transformer block, then to the whole model (in place).

    A unit per block is FSDP's usual grain: one block's weights are gathered
    at a time in the forward and backward passes, so the peak holds one whole
    block beside the shards. The root unit holds the rest (embeddings, the
    tied output layer, the last norm). The default mesh is every process of
    the group Accelerate initialised.
    """
    from nanogpt_core.errors import NanoGPTError

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # public from torch 2.6
        raise NanoGPTError(
            f'train.parallelism = "fsdp" needs torch 2.6 or newer; this is torch '
            f'{torch.__version__}: upgrade torch or use parallelism = "ddp"'
        ) from None
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def prepare_for_training(
    model: torch.nn.Module,
    make_optimizer: Callable[[torch.nn.Module], Any],
    accelerator: Any,
    *,
    compile_model: bool,
    sharded: bool,
    who: str,
) -> tuple[Any, Any]:
    """The model the loop calls and the optimizer it steps, sharded or not.

    Under FSDP the model is sharded first, so that the optimizer, built next,
    holds the shards; Accelerate then prepares the optimizer alone (it steps
    through the fp16 loss scaler), never the sharded model.
    """
    if sharded:
        shard_model(model)
    optimizer = make_optimizer(model)
    compiled = torch.compile(model) if compile_model else model
    if sharded:
        return compiled, prepare_contained(accelerator, None, optimizer, who)[1]
    return prepare_contained(accelerator, compiled, optimizer, who)


def micro_step(
    accelerator: Any, model: torch.nn.Module, *, last: bool, sharded: bool
) -> contextlib.AbstractContextManager[Any]:
    """What one micro-step's forward and backward run in: gradients reduced on the ``last`` only.

    Under DDP that is Accelerate's ``accumulate``; under FSDP the model is told
    whether this backward reduce-scatters (before the last micro-step each
    process accumulates its unsharded gradients locally).
    """
    if not sharded:
        return accelerator.accumulate(model)
    getattr(model, "_orig_mod", model).set_requires_gradient_sync(last)  # under compile too
    return contextlib.nullcontext()


def clip_gradients(
    accelerator: Any, model: torch.nn.Module, clip: float, *, sharded: bool
) -> torch.Tensor:
    """Clip the gradient norm to ``clip`` (0: never); returns the norm before clipping.

    Under fp16 the gradients are unscaled first (Accelerate's clip does that
    itself), so the norm and the clip are in true units.
    """
    max_norm = clip if clip > 0 else float("inf")
    if not sharded:
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)
    accelerator.unscale_gradients()
    return clip_sharded(model.parameters(), max_norm)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor`` (a ``DTensor``'s local shard; a plain tensor as it is)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def clip_sharded(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip sharded gradients to a global norm of ``max_norm``; returns the norm before clipping.

    ``get_total_norm`` of ``DTensor`` gradients is a ``DTensor`` whose
    ``full_tensor()`` reduces the shards' partial norms across processes, so
    every process clips with the same factor, the one the whole model's
    gradient gives (as torchtitan does).
    """
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def all_finite(accelerator: Any, flags: torch.Tensor) -> torch.Tensor:
    """``flags`` (one bool per tensor, for this process's shards) and-ed over every process."""
    return accelerator.gather(flags.int()[None, :]).min(dim=0).values.bool()


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, on the main process (``{}`` on the others).

    Every process must call it: the shards are gathered one tensor at a time
    into the main process's memory (``cpu_offload``), never a whole copy on a
    device.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def load_full_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load whole weights (every process holds them) into the sharded model: each keeps its rows."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
