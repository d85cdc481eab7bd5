"""The losses the trainer logs at each evaluation (``train_loss`` and ``val_loss``).

Each is the mean loss over ``train.eval_batches`` fixed batches of its split:
the same batches at every evaluation, drawn apart from the training stream, so
two evaluations of a run compare like with like.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from nanogpt_core.eval.evaluator import EVAL_SEED_OFFSET, fixed_loss_batches

if TYPE_CHECKING:
    from nanogpt_core.config.experiment import ExperimentConfig
    from nanogpt_core.data.prepared import PreparedData


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module,
    data: PreparedData,
    config: ExperimentConfig,
    block_size: int,
    accelerator: Any,
) -> dict[str, float]:
    """Mean loss over ``eval_batches`` fixed batches of each split, averaged over processes.

    For fine-tuning data the batches are whole examples and the loss is on
    their response tokens. The model is left in training mode.

    :param model: the model as the accelerator prepared it.
    :param block_size: the model's context length.
    """
    out: dict[str, float] = {}
    model.eval()
    for split in ("train", "val"):
        batches = fixed_loss_batches(
            data,
            split,
            seed=config.seed + EVAL_SEED_OFFSET,
            batch_size=config.train.batch_size,
            block_size=block_size,
            count=config.train.eval_batches,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
        )
        losses = [loss.float() for loss in _losses(model, batches, accelerator)]
        mean = torch.stack(losses).mean()
        out[f"{split}_loss"] = accelerator.reduce(mean, reduction="mean").item()
    model.train()
    return out


def _losses(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    accelerator: Any,
) -> Iterator[torch.Tensor]:
    for x, y in batches:
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        with accelerator.autocast():
            _, loss = model(x, y)
        yield loss
