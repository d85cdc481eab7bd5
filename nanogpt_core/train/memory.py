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
    """Parameters of our GPT of this shape (a ``GPTConfig``), without building it.

    Every architecture option counts: learned positions or none (RoPE), the
    norms (LayerNorm's bias, RMSNorm's gain alone), SwiGLU's third matrix,
    qk-norm's gains, and an untied output layer, which is a second
    vocabulary-by-width matrix. A tied output layer counts once, as in
    ``GPT.num_params``.
    """
    from nanogpt_core.model.config import mlp_hidden_size

    c, bias = config.n_embd, config.bias
    norm = 2 * c if config.norm == "layernorm" and bias else c
    attention = 4 * c * c + (4 * c if bias else 0)  # c_attn (3c^2) and c_proj (c^2)
    if config.qk_norm:
        attention += 2 * (c // config.n_head)
    hidden = mlp_hidden_size(config)
    up = c * hidden + (hidden if bias else 0)
    mlp = (2 if config.mlp == "swiglu" else 1) * up + hidden * c + (c if bias else 0)
    total = config.vocab_size * c + config.n_layer * (2 * norm + attention + mlp) + norm
    if config.position == "learned":
        total += config.block_size * c
    if not config.tie_embeddings:
        total += config.vocab_size * c
    return total


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
