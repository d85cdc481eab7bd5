"""GPU decisions seen from the CPU: torch's own device queries are faked, never ours.

On a V100 (compute capability 7.0) torch 2.13's ``is_bf16_supported()`` answers
True (bf16 is emulated there), so every fake V100 below says so too: the
decisions must come from the compute capability.
"""

from __future__ import annotations

import re

import pytest
import torch

from nanogpt_core.gpus import (
    GPUS,
    allow_tf32,
    auto_precision,
    gpu_for_device,
    gpu_named,
    peak_flops,
)
from nanogpt_core.plan.hardware import parse_gpus

V100, A100, H100 = (7, 0), (8, 0), (9, 0)

# What torch.cuda.get_device_name() says on each card, and its dense half-precision peak.
DEVICE_NAMES = [
    ("Tesla V100-SXM2-16GB", V100, "fp16", 125e12),
    ("Tesla V100-SXM2-32GB", V100, "fp16", 125e12),
    ("Tesla V100-PCIE-16GB", V100, "fp16", 112e12),
    ("Tesla V100-PCIE-32GB", V100, "fp16", 112e12),
    ("Tesla V100S-PCIE-32GB", V100, "fp16", 130e12),
    ("Tesla V100-SXM2-32GB", V100, "bf16", None),  # emulated bf16 has no peak
    ("NVIDIA A100-SXM4-40GB", A100, "bf16", 312e12),
    ("NVIDIA A100-SXM4-80GB", A100, "bf16", 312e12),
    ("NVIDIA A100-PCIE-40GB", A100, "fp16", 312e12),
    ("NVIDIA A100 80GB PCIe", A100, "bf16", 312e12),
    ("NVIDIA A10", (8, 6), "bf16", 125e12),
    ("NVIDIA A10G", (8, 6), "bf16", None),  # not in the table: no guess
    ("NVIDIA L4", (8, 9), "bf16", 121e12),
    ("NVIDIA L40S", (8, 9), "bf16", 362e12),
    ("NVIDIA L40", (8, 9), "bf16", None),
    ("NVIDIA H100 80GB HBM3", H100, "bf16", 989e12),
    ("NVIDIA H100 PCIe", H100, "bf16", 756e12),
    ("NVIDIA H100 NVL", H100, "bf16", 835e12),
    ("NVIDIA H200", H100, "bf16", 989e12),
    ("NVIDIA H200 NVL", H100, "bf16", 835e12),
    ("NVIDIA GH200 480GB", H100, "bf16", 989e12),
    ("NVIDIA GeForce RTX 4090", (8, 9), "bf16", None),
    ("NVIDIA A100-SXM4-80GB", A100, "no", None),  # full precision: no tensor-core peak
]


@pytest.mark.parametrize(("name", "cc", "precision", "expected"), DEVICE_NAMES)
def test_peak_flops_match_the_specific_name_first(name, cc, precision, expected):
    assert peak_flops(name, precision, cc) == expected


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make torch report CUDA with the given capability (and bf16 'support' regardless)."""
    asked: list[object] = []

    def install(cc: tuple[int, int]) -> list[object]:
        def get_device_capability(device=None):
            asked.append(device)
            return cc

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(
            torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda")
        )
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-16GB")
        return asked

    return install


@pytest.mark.parametrize(
    ("cc", "expected"), [(V100, "fp16"), ((7, 5), "fp16"), (A100, "bf16"), (H100, "bf16")]
)
def test_auto_precision_follows_the_compute_capability(fake_gpu, cc, expected):
    asked = fake_gpu(cc)
    assert auto_precision(torch.device("cuda", 3)) == expected
    assert asked == [torch.device("cuda", 3)]  # the process's own device, not GPU 0


def test_auto_precision_on_the_cpu_is_no_autocast():
    assert auto_precision(torch.device("cpu")) == "no"


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's process-wide state, reset before and after (the fake GPU must not leak)."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def test_make_accelerator_asks_the_device_only_after_accelerate_set_it(
    fake_gpu, fresh_accelerate_state, monkeypatch
):
    from accelerate import PartialState

    from nanogpt_core.config.experiment import TrainConfig
    from nanogpt_core.train.run import make_accelerator

    made: dict[str, object] = {}
    asked = fake_gpu(V100)
    states_when_asked: list[bool] = []
    real_capability = torch.cuda.get_device_capability

    def capability(device=None):
        states_when_asked.append(PartialState._shared_state != {})
        return real_capability(device)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr("accelerate.Accelerator", lambda **kwargs: made.update(kwargs))
    make_accelerator(TrainConfig(mixed_precision="auto"))
    assert made == {"mixed_precision": "fp16", "gradient_accumulation_steps": 1, "cpu": False}
    assert asked and all(d == PartialState().device for d in asked)
    assert states_when_asked and all(states_when_asked)


def test_bf16_on_a_v100_is_refused_even_though_torch_emulates_it(
    fake_gpu, fresh_accelerate_state, monkeypatch
):
    from nanogpt_core.config.experiment import TrainConfig
    from nanogpt_core.errors import NanoGPTError
    from nanogpt_core.train.run import make_accelerator

    fake_gpu(V100)
    monkeypatch.setattr("accelerate.Accelerator", lambda **kwargs: None)
    with pytest.raises(NanoGPTError, match=r'"bf16": Tesla V100-SXM2-16GB has no bf16 units'):
        make_accelerator(TrainConfig(mixed_precision="bf16"))


@pytest.fixture
def tf32_flags():
    """TF32 settings restored after the test."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    yield matmul, conv
    matmul.fp32_precision, conv.fp32_precision = saved


def test_tf32_only_on_gpus_that_have_it(fake_gpu, tf32_flags):
    matmul, conv = tf32_flags
    matmul.fp32_precision = conv.fp32_precision = "ieee"
    fake_gpu(V100)
    assert not allow_tf32(torch.device("cuda", 0))
    assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    fake_gpu(A100)
    assert allow_tf32(torch.device("cuda", 0))
    assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    assert not allow_tf32(torch.device("cpu"))


# The plan's table: what each card's device name finds, and how --gpus names it.
TABLE_ENTRIES = [
    ("Tesla V100-SXM2-16GB", "V100-16GB", 16),
    ("Tesla V100-SXM2-32GB", "V100-32GB", 32),
    ("Tesla V100-PCIE-16GB", "V100-PCIe-16GB", 16),
    ("Tesla V100-PCIE-32GB", "V100-PCIe-32GB", 32),
    ("Tesla V100S-PCIE-32GB", "V100S-32GB", 32),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB", 40),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB", 80),
    ("NVIDIA A100-PCIE-40GB", "A100-PCIe-40GB", 40),
    ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB", 80),
    ("NVIDIA H100 80GB HBM3", "H100-80GB", 80),
    ("NVIDIA H100 PCIe", "H100-PCIe-80GB", 80),
    ("NVIDIA H200", "H200-141GB", 141),
]


@pytest.mark.parametrize(("device_name", "table_name", "gib"), TABLE_ENTRIES)
def test_a_device_name_finds_its_own_entry_with_its_memory(device_name, table_name, gib):
    gpu = gpu_for_device(device_name)
    assert gpu is not None and gpu.name == table_name
    assert gpu.memory == gib * 2**30
    assert gpu_named(table_name) is gpu
    assert gpu_named(table_name.lower()) is gpu


def test_every_table_entry_is_named_uniquely_and_has_figures():
    names = [gpu.name for gpu in GPUS]
    assert len(set(names)) == len(names)
    for gpu in GPUS:
        assert 0 < gpu.mfu < 1 and gpu.peak > 1e13 and gpu.pcie > 0
        # Each entry is reachable by its own name (no prefix of one hides another).
        assert gpu_named(gpu.name) is gpu


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8xV100-32GB", (8, "V100-32GB")),
        ("8 x a100-80gb", (8, "a100-80gb")),
        ("16*H100-80GB", (16, "H100-80GB")),
        ("4", (4, None)),
        ("H200-141", (1, "H200-141")),
    ],
)
def test_gpus_option_parses_count_and_name(text, expected):
    assert parse_gpus(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8xV100", "several GPUs match 'V100'; one of: V100S-32GB, V100-PCIe-16GB"),
        ("2xRTX4090", "unknown GPU 'RTX4090'; one of: V100S-32GB"),
        ("0xA100-80GB", "at least 1"),
    ],
)
def test_gpus_option_refuses_unknown_ambiguous_and_zero(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_gpus(text)
