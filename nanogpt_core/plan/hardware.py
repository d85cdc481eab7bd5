"""The devices a plan is for: a named GPU from the table, this machine's GPU, or its CPU.

``gpt plan --gpus 8xV100-32GB`` sizes the run for eight 32 GB V100s whatever
machine it runs on; without a name it is this machine's device (the GPU a run
would take, else the CPU and its available memory). The precision a run would
use there follows the same rules as ``gpt run`` (:mod:`nanogpt_core.gpus`).
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from nanogpt_core.errors import ConfigError
from nanogpt_core.gpus import BF16_CAPABILITY, GPU, INFINIBAND_BANDWIDTH, gpu_for_device, gpu_named

GPUS_PATTERN = re.compile(r"(?:(\d+)\s*[xX*]\s*)?(.*)")
INTERCONNECTS = ("nvlink", "pcie", "infiniband")


@attrs.frozen
class Hardware:
    """``count`` devices of one kind.

    Attributes:
        count: processes (one per device).
        name: the device as the plan names it (``"V100-32GB"``, ``"CPU"``).
        gpu: its entry in :data:`nanogpt_core.gpus.GPUS`, or None (CPU, unknown GPU).
        memory: bytes a process may use: a GPU's memory, or the machine's
            available memory on the CPU; None when unknown.
        capability: compute capability ((0, 0) for the CPU).
    """

    count: int
    name: str
    gpu: GPU | None
    memory: int | None
    capability: tuple[int, int] = (0, 0)

    @property
    def cuda(self) -> bool:
        """Whether these are GPUs."""
        return self.capability != (0, 0)


def parse_gpus(text: str) -> tuple[int, str | None]:
    """``"8xV100-32GB"`` → ``(8, "V100-32GB")``; ``"8"`` → ``(8, None)``; ``"A100-80GB"`` → ``(1, ...)``.

    :raises ValueError: naming what is wrong.
    """
    match = GPUS_PATTERN.fullmatch(text.strip())
    count_text, name = (match.group(1), match.group(2).strip()) if match else (None, "")
    if name.isdigit() and count_text is None:
        count_text, name = name, ""
    count = int(count_text) if count_text else 1
    if count < 1:
        raise ValueError(f"{text!r}: the number of GPUs must be at least 1")
    if name:
        gpu_named(name)  # unknown or ambiguous names fail here, naming the choices
    return count, name or None


def named_hardware(count: int, name: str) -> Hardware:
    """``count`` GPUs of the table's kind ``name``."""
    gpu = gpu_named(name)
    return Hardware(count, gpu.name, gpu, gpu.memory, gpu.capability)


def local_hardware(count: int, device: str = "auto") -> Hardware:
    """``count`` of this machine's devices, as ``train.device`` would pick them."""
    import torch

    cuda = device != "cpu" and torch.cuda.is_available()
    return device_hardware(count, torch.device("cuda", 0) if cuda else torch.device("cpu"))


def device_hardware(count: int, device: Any) -> Hardware:
    """``count`` devices like ``device`` (a ``torch.device``: a run's own)."""
    import torch

    from nanogpt_core.train.memory import available_bytes

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        total = torch.cuda.get_device_properties(device).total_memory
        return Hardware(count, name, gpu_for_device(name), int(total), (int(major), int(minor)))
    available, _words = available_bytes(device)
    # Processes on one CPU share its memory.
    return Hardware(count, "CPU", None, available // count if available else None)


def hardware_precision(setting: str, hardware: Hardware) -> str:
    """``train.mixed_precision`` on ``hardware``, refused as ``gpt run`` would refuse it there."""
    has_bf16 = hardware.capability >= BF16_CAPABILITY
    if setting == "auto":
        return ("bf16" if has_bf16 else "fp16") if hardware.cuda else "no"
    if setting == "fp16" and not hardware.cuda:
        raise ConfigError(
            ['train.mixed_precision = "fp16" needs a GPU; use "auto", "bf16" or "no" on the CPU']
        )
    if setting == "bf16" and hardware.cuda and not has_bf16:
        raise ConfigError(
            [
                f'train.mixed_precision = "bf16": {hardware.name} has no bf16 units (it would '
                'emulate them, slowly and without loss scaling); use "auto" or "fp16"'
            ]
        )
    return setting


def interconnect_bandwidth(
    hardware: Hardware, interconnect: str | None
) -> tuple[str, float] | None:
    """The link gradients are all-reduced over, and its bus bandwidth in bytes/s.

    Default: none for one device; InfiniBand beyond one 8-GPU node; else NVLink
    where the card has it, PCIe otherwise. None when the bandwidth is unknown
    (the CPU, a GPU not in the table).
    """
    gpu = hardware.gpu
    if hardware.count == 1 or gpu is None:
        return None
    if interconnect is None:
        interconnect = "infiniband" if hardware.count > 8 else "nvlink" if gpu.nvlink else "pcie"
    if interconnect == "nvlink":
        if gpu.nvlink is None:
            raise ConfigError(
                [f"--interconnect nvlink: {gpu.name} has no NVLink; use pcie or infiniband"]
            )
        return interconnect, gpu.nvlink
    if interconnect == "pcie":
        return interconnect, gpu.pcie
    return interconnect, INFINIBAND_BANDWIDTH


def describe(hardware: Hardware) -> str:
    """``8 x V100-32GB`` or ``CPU``."""
    return hardware.name if hardware.count == 1 else f"{hardware.count} x {hardware.name}"
