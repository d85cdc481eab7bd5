"""``torch.optim.Muon`` with its Newton-Schulz iteration in a dtype of our choosing.

torch runs the orthogonalisation in bfloat16: fast on GPUs with bf16 matrix
units (A100 and later), but a V100 has none and CPUs without bf16 matrix
instructions emulate it about twenty times slower than float32. This subclass
keeps everything of ``torch.optim.Muon`` (its options, param groups,
``momentum_buffer`` state and so its checkpoints) and changes only the dtype of
that iteration: float16 for a V100's tensor cores, float32 for CPUs. Under
FSDP it orthogonalises each whole matrix, gathered from its shards. The
``muon`` plugin picks it where ``ns_dtype`` says so. (The module keeps its first
name, from when float32 was its only dtype; so does :data:`Float32Muon`.)
"""

from __future__ import annotations

import math
from typing import Any

import torch


def orthogonalize(
    grad: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """torch's quintic Newton-Schulz iteration (Keller Jordan's), computed in ``dtype``.

    The matrix is normalised in float32 before it is cast: a gradient's entries
    (often 1e-6 and smaller) would underflow float16, its normalised ones (the
    Frobenius norm is 1, so each is at most 1) do not, and the iteration keeps
    the singular values near 1, far inside float16's range.
    """
    a, b, c = coefficients
    x = grad.float()
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = (x / x.norm().clamp(min=eps)).to(dtype)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, rule: str | None, shape: torch.Size) -> float:
    """torch's per-shape learning-rate scale ("original" or "match_rms_adamw")."""
    rows, cols = shape[:2]
    if rule == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))


def _orthogonalize_whole(update: torch.Tensor, *args: Any) -> torch.Tensor:
    """:func:`orthogonalize` of the whole matrix, also when ``update`` is a shard (FSDP).

    Newton-Schulz needs the whole matrix: run on a ``DTensor``, its matrix
    products would be computed piecewise across processes, in another order
    than DDP's. So the matrix is gathered (one all-gather per matrix and step),
    every process orthogonalises it as a DDP process would, and keeps its own
    rows: the update equals DDP's.
    """
    full_tensor = getattr(update, "full_tensor", None)
    if full_tensor is None:
        return orthogonalize(update, *args)
    from torch.distributed.tensor import distribute_tensor

    whole = orthogonalize(full_tensor(), *args)
    # src_data_rank=None: each process slices its rows from its own copy, no scatter.
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)


class CastMuon(torch.optim.Muon):
    """``torch.optim.Muon``, the same update, with the Newton-Schulz iteration in ``ns_dtype``.

    :param ns_dtype: the iteration's dtype (float32 by default; float16 on a
        V100). Kept on the optimizer, not in its param groups, so the state
        dict is ``torch.optim.Muon``'s and a checkpoint resumes on any GPU.
    """

    def __init__(self, params: Any, *, ns_dtype: torch.dtype = torch.float32, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Muon step: momentum, orthogonalised update, decoupled weight decay."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        param.grad, memory_format=torch.preserve_format
                    )
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = _orthogonalize_whole(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
                )
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


# The float32 twin's first name: CastMuon's default dtype is float32.
Float32Muon = CastMuon
