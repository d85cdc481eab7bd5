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


def parameter_count(config: Any) -> int:
    """Parameters of our GPT of this shape (a ``GPTConfig``), without allocating it.

    The model is built on torch's ``meta`` device, where tensors have shapes
    but no storage: the count is ``GPT.num_params``'s by construction (every
    architecture option counts, a tied output layer once) and a new model
    option needs nothing here. GPT-2 XL takes a fifth of a second and no memory.
    """
    import torch

    from nanogpt_core.model.gpt import GPT

    with torch.device("meta"):
        return GPT(config).num_params()


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
