"""The precision ``gpt serve`` runs in, and whether its KV cache fits the device.

``--dtype auto`` serves in half precision on CUDA: float16 on compute
capability 7.x (V100, T4: no bfloat16 arithmetic), bfloat16 from 8.0 (A100,
H100: float16's range without its overflow), float32 on the CPU. The KV cache
takes the same dtype, ``2 * n_layer * n_embd * bytes`` per row and token, and
the batch needs ``max_batch + 1`` rows of ``block_size`` tokens (one spare row
for prefilling): :func:`check_kv_fits` refuses a ``--max-batch`` whose cache
would not fit the device's free memory, before the server starts.
"""

from __future__ import annotations

from typing import Any

import torch

from nanogpt_core.errors import NanoGPTError
from nanogpt_core.model.batch_cache import kv_bytes_per_token

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype ``--dtype name`` means on ``device`` (``auto``: by the GPU's capability)."""
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    major, _minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return torch.bfloat16
    return torch.float16 if major == 7 else torch.float32


def to_dtype(model: Any, dtype: torch.dtype) -> None:
    """Cast the model's weights to ``dtype`` in place; RoPE's frequencies stay float32.

    The rotation angles are position x frequency: frequencies rounded to half
    precision would turn far positions by the wrong angle.
    """
    frequencies = getattr(model, "rope_inv_freq", None)
    model.to(dtype)
    if frequencies is not None:
        model.rope_inv_freq = frequencies.float()


def kv_cache_bytes(config: Any, max_batch: int, dtype: torch.dtype) -> int:
    """Bytes of the batched KV cache: ``max_batch`` rows and the prefill row, full windows."""
    return (max_batch + 1) * config.block_size * kv_bytes_per_token(config, dtype)


def kv_problem(config: Any, max_batch: int, dtype: torch.dtype, free: int) -> str | None:
    """Why ``max_batch`` rows cannot be served with ``free`` bytes left, or None."""
    need = kv_cache_bytes(config, max_batch, dtype)
    if need <= free:
        return None
    per_row = config.block_size * kv_bytes_per_token(config, dtype)
    fits = max(free // per_row - 1, 0)
    return (
        f"--max-batch {max_batch}: the KV cache needs {need / 2**30:.2f} GiB "
        f"({max_batch} + 1 rows x {config.block_size} tokens x "
        f"{kv_bytes_per_token(config, dtype)} bytes) but the device has "
        f"{free / 2**30:.2f} GiB free; use --max-batch {fits} or less"
    )


def check_kv_fits(config: Any, max_batch: int, dtype: torch.dtype, device: torch.device) -> None:
    """Raise a one-line :class:`NanoGPTError` when the KV cache cannot fit a CUDA device.

    The CPU is not checked: its memory is the host's, shared and swappable.
    """
    if device.type != "cuda":
        return
    torch.cuda.empty_cache()  # the float32 weights a cast left behind are free too
    free, _total = torch.cuda.mem_get_info(device)
    problem = kv_problem(config, max_batch, dtype, free)
    if problem is not None:
        raise NanoGPTError(problem)
