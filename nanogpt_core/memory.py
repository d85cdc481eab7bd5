"""Will the model fit? Estimating memory before anything is allocated.

Building a model that cannot fit ends, at best, in a ``CUDA out of memory``
traceback minutes into a run and, at worst, in the machine swapping itself to a
standstill. The parameter count of a GPT follows from its shape, so the core
checks it first and refuses with the estimate.
"""

from __future__ import annotations

import os
from typing import Any

# fp32 weights (4) + gradients (4) + AdamW's two moments (8) per parameter.
TRAINING_BYTES_PER_PARAMETER = 16


def parameter_count(
    *, vocab_size: int, block_size: int, n_layer: int, n_embd: int, bias: bool
) -> int:
    """Parameters of our GPT (the tied output layer counts once), from its shape alone."""
    c = n_embd
    per_block = 12 * c * c + 2 * c  # attention (4c^2) + MLP (8c^2) + two norms' gains
    if bias:
        per_block += 9 * c + 2 * c  # linear biases (3c + c + 4c + c) + the norms' biases
    final_norm = c * (2 if bias else 1)
    return vocab_size * c + block_size * c + n_layer * per_block + final_norm


def available_bytes(device: Any) -> tuple[int | None, str]:
    """Memory a training run on ``device`` can use, and a name for it in messages."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        _free, total = torch.cuda.mem_get_info(device)
        return int(total), f"{torch.cuda.get_device_name(device)} has"
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "this machine has"
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None, "unknown"
    return int(pages), "this machine has"


def human_bytes(n: float) -> str:
    """``1.5 GiB`` and the like."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
