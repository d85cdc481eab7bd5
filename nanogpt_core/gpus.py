"""What a CUDA device can do: half-precision units, TF32, and its peak FLOPs.

Every decision here is made from the device's compute capability or its name,
never from ``torch.cuda.is_bf16_supported()``: since torch 2.x that answers True
on a V100 too (bf16 is *emulated* there, without tensor cores), which would send
our first user's fp16 hardware down a path ten times slower with no loss scaling.

Nothing here touches a CUDA device before the caller has set its process's
device (see :func:`nanogpt_core.train.run.make_accelerator`): every query names the
device it asks about.
"""

from __future__ import annotations

import re
from typing import Any

# Compute capability from which a GPU has bf16 (and TF32) tensor cores: Ampere.
BF16_CAPABILITY = (8, 0)

# Dense fp16/bf16 tensor-core peaks (fp32 accumulation), in FLOP/s, from NVIDIA's
# data sheets (the "with sparsity" figures halved). Matched in order against
# ``torch.cuda.get_device_name()``, so the specific names come before the general
# ones ("V100S" and "V100-PCIE" before "V100", "GH200" and "H200 NVL" before
# "H200"). A device not listed gets no MFU rather than another chip's figure.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    (r"V100S", 130e12),
    (r"V100[- ]PCIE", 112e12),
    (r"V100", 125e12),  # SXM2 / SXM3
    (r"A100", 312e12),  # SXM4 and PCIe alike
    (r"A10(?![0-9G])", 125e12),
    (r"L40S", 362e12),
    (r"\bL4\b", 121e12),
    (r"GH200", 989e12),
    (r"H200 NVL", 835e12),
    (r"H200", 989e12),
    (r"H100 NVL", 835e12),
    (r"H100 PCIE", 756e12),
    (r"H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
)


def peak_flops(device_name: str, mixed_precision: str, capability: tuple[int, int]) -> float | None:
    """The tensor-core peak of ``device_name`` at ``mixed_precision``, else None.

    :param device_name: what ``torch.cuda.get_device_name`` says.
    :param mixed_precision: ``"fp16"`` or ``"bf16"``; full precision has no
        tensor-core peak here (TF32's is another figure), so None.
    :param capability: the device's compute capability; bf16 below 8.0 is
        emulated and has no peak.
    """
    if mixed_precision not in ("bf16", "fp16"):
        return None
    if mixed_precision == "bf16" and tuple(capability) < BF16_CAPABILITY:
        return None
    for pattern, flops in PEAK_FLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return flops
    return None


def capability(device: Any) -> tuple[int, int]:
    """The compute capability of a CUDA ``device`` ((0, 0) for anything else)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return (0, 0)
    major, minor = torch.cuda.get_device_capability(device)
    return (int(major), int(minor))


def has_bf16_units(device: Any) -> bool:
    """Whether ``device`` is a GPU with bf16 tensor cores (compute capability 8.0+)."""
    return capability(device) >= BF16_CAPABILITY


def auto_precision(device: Any) -> str:
    """``train.mixed_precision = "auto"`` on ``device``.

    bf16 on GPUs with bf16 units (A100, H100), fp16 with loss scaling on older
    GPUs (V100: compute capability 7.0), no autocast on the CPU.
    """
    if getattr(device, "type", str(device)) != "cuda":
        return "no"
    return "bf16" if has_bf16_units(device) else "fp16"


def allow_tf32(device: Any) -> bool:
    """Let float32 matmuls and convolutions use TF32 on GPUs that have it (8.0+).

    nanoGPT does the same: TF32 keeps float32's range with a 10-bit mantissa, and
    what autocast leaves in float32 (the loss, the norms' statistics) runs several
    times faster on an A100. Returns whether TF32 was allowed.
    """
    import torch

    if not has_bf16_units(device):
        return False
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch 2.9+: the old flags are deprecated
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return True
