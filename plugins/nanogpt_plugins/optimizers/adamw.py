"""The ``adamw`` optimizer: nanoGPT's AdamW, its hyperparameters from ``[train]``.

Weight decay applies to the 2-D tensors (matrices and embeddings) only: biases
and norm gains (1-D) are not decayed, since shrinking them toward zero only
hurts. The fused kernel is used on CUDA where torch has it.
"""

from __future__ import annotations

import inspect
from typing import Any

from nanogpt_core import hookimpl


def decay_split(model: Any) -> tuple[list[Any], list[Any]]:
    """The trainable parameters to decay (2-D and up) and not to decay (1-D), in model order."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


class AdamW:
    """Builds ``torch.optim.AdamW`` with ``train.learning_rate``, betas and weight decay."""

    def __init__(self, options: Any) -> None:
        self.options = options

    def build(self, model: Any, train: Any, device_type: str) -> Any:
        """Two groups: decayed matrices and embeddings, undecayed biases and gains."""
        import torch

        decay, no_decay = decay_split(model)
        groups = [
            {"params": decay, "weight_decay": train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(
            groups, lr=train.learning_rate, betas=(train.beta1, train.beta2), **extra
        )


@hookimpl
def register_optimizers(register):
    """The built-in ``adamw`` optimizer (no options of its own: ``[train]`` has them)."""
    register(
        "adamw",
        AdamW,
        description="nanoGPT's AdamW; learning_rate, betas and weight_decay from [train].",
    )
