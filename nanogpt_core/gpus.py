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

import attrs

# Compute capability from which a GPU has bf16 (and TF32) tensor cores: Ampere.
BF16_CAPABILITY = (8, 0)

GIB = 1024**3


@attrs.frozen
class GPU:
    """One kind of GPU: what ``gpt plan`` sizes a run for and what MFU divides by.

    Attributes:
        name: how ``gpt plan --gpus 8xNAME`` names it (``"V100-32GB"``).
        pattern: a regular expression matched against ``torch.cuda.get_device_name()``.
        memory: bytes of device memory.
        capability: compute capability; from (8, 0) it has bf16 tensor cores.
        peak: dense fp16/bf16 tensor-core FLOP/s (fp32 accumulation).
        mfu: the model FLOPs utilisation a GPT-2-sized run typically reaches on it,
            the plan's default assumption.
        nvlink: NCCL all-reduce bus bandwidth (bytes/s) between 8 such GPUs over
            NVLink, or None for cards without it.
        pcie: the same over PCIe (the host's generation for that card).
    """

    name: str
    pattern: str
    memory: int
    capability: tuple[int, int]
    peak: float
    mfu: float
    nvlink: float | None
    pcie: float


# Peaks from NVIDIA's data sheets (the "with sparsity" figures halved). The MFU
# defaults are what nanoGPT-style GPT-2 runs report: about 35 % in fp16 on V100s,
# 45 % in bf16 on A100s, 40 % on H100s (their peak grew faster than their
# memory bandwidth). Bus bandwidths are typical nccl-tests all-reduce figures:
# DGX-1 V100 (NVLink 2, hybrid cube mesh) 130 GB/s, A100 NVSwitch 230 GB/s,
# H100/H200 NVSwitch 450 GB/s; PCIe gen 3 12 GB/s, gen 4 24 GB/s, gen 5 48 GB/s.
# Matched against device names in order, so the specific names come before the
# general ones ("V100S" and "V100-PCIE" before "V100", "GH200" and "H200 NVL"
# before "H200"). A device not listed gets no MFU rather than another chip's figure.
V100, A100, ADA, HOPPER = (7, 0), (8, 0), (8, 9), (9, 0)
GPUS: tuple[GPU, ...] = (
    GPU("V100S-32GB", r"V100S", 32 * GIB, V100, 130e12, 0.35, None, 12e9),
    GPU("V100-PCIe-16GB", r"V100[- ]PCIE.*16", 16 * GIB, V100, 112e12, 0.35, None, 12e9),
    GPU("V100-PCIe-32GB", r"V100[- ]PCIE", 32 * GIB, V100, 112e12, 0.35, None, 12e9),
    GPU("V100-16GB", r"V100.*16", 16 * GIB, V100, 125e12, 0.35, 130e9, 12e9),  # SXM2
    GPU("V100-32GB", r"V100", 32 * GIB, V100, 125e12, 0.35, 130e9, 12e9),  # SXM2 / SXM3
    GPU("A100-PCIe-40GB", r"A100[- ]PCIE.*40", 40 * GIB, A100, 312e12, 0.45, None, 24e9),
    GPU("A100-PCIe-80GB", r"A100.*PCIE", 80 * GIB, A100, 312e12, 0.45, None, 24e9),
    GPU("A100-40GB", r"A100.*40", 40 * GIB, A100, 312e12, 0.45, 230e9, 24e9),  # SXM4
    GPU("A100-80GB", r"A100", 80 * GIB, A100, 312e12, 0.45, 230e9, 24e9),
    GPU("A10-24GB", r"A10(?![0-9G])", 24 * GIB, (8, 6), 125e12, 0.35, None, 24e9),
    GPU("L40S-48GB", r"L40S", 48 * GIB, ADA, 362e12, 0.35, None, 24e9),
    GPU("L4-24GB", r"\bL4\b", 24 * GIB, ADA, 121e12, 0.35, None, 24e9),
    GPU("GH200-96GB", r"GH200", 96 * GIB, HOPPER, 989e12, 0.40, 450e9, 48e9),
    GPU("H200-NVL-141GB", r"H200 NVL", 141 * GIB, HOPPER, 835e12, 0.40, None, 48e9),
    GPU("H200-141GB", r"H200", 141 * GIB, HOPPER, 989e12, 0.40, 450e9, 48e9),
    GPU("H100-NVL-94GB", r"H100 NVL", 94 * GIB, HOPPER, 835e12, 0.40, None, 48e9),
    GPU("H100-PCIe-80GB", r"H100 PCIE", 80 * GIB, HOPPER, 756e12, 0.40, None, 48e9),
    GPU("H100-80GB", r"H100", 80 * GIB, HOPPER, 989e12, 0.40, 450e9, 48e9),  # SXM5
)

# InfiniBand between nodes, per GPU: one 100 Gb/s EDR link (DGX-1's four for
# eight V100s is less; an A100/H100 DGX's one 200-400 Gb/s link per GPU is more).
INFINIBAND_BANDWIDTH = 12.5e9


def gpu_for_device(device_name: str) -> GPU | None:
    """The table's entry for what ``torch.cuda.get_device_name`` says, else None."""
    for gpu in GPUS:
        if re.search(gpu.pattern, device_name, flags=re.IGNORECASE):
            return gpu
    return None


def gpu_named(name: str) -> GPU:
    """The table's entry called ``name`` (any case), or the one entry whose name starts so.

    :raises ValueError: naming the choices, when none or several match.
    """
    wanted = name.strip().lower()
    exact = [gpu for gpu in GPUS if gpu.name.lower() == wanted]
    found = exact or [gpu for gpu in GPUS if gpu.name.lower().startswith(wanted)]
    if len(found) == 1:
        return found[0]
    choices = found or GPUS
    raise ValueError(
        f"{'several GPUs match' if found else 'unknown GPU'} {name!r}; one of: "
        + ", ".join(gpu.name for gpu in choices)
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
    gpu = gpu_for_device(device_name)
    return gpu.peak if gpu is not None else None


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
