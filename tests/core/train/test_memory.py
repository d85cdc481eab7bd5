"""The memory estimate: the exact parameter count of every shape, against free memory."""

from __future__ import annotations

import itertools

import attrs
import pytest
import torch

from nanogpt_core.config.experiment import ExperimentConfig, PluginSpec, TrainConfig
from nanogpt_core.errors import ConfigError
from nanogpt_core.model.gpt import GPT, GPTConfig
from nanogpt_core.train.memory import parameter_count
from nanogpt_core.train.run import check_memory

SHAPES = list(
    itertools.product(
        ("learned", "rope"),  # position
        ("layernorm", "rmsnorm"),  # norm
        ("gelu", "swiglu", "relu2"),  # mlp
        (False, True),  # qk_norm
        (False, True),  # tie_embeddings
        (False, True),  # bias
    )
)


@pytest.mark.parametrize(("position", "norm", "mlp", "qk_norm", "tie", "bias"), SHAPES)
def test_the_count_equals_the_built_model(position, norm, mlp, qk_norm, tie, bias):
    config = GPTConfig(
        block_size=40, vocab_size=96, n_layer=3, n_head=2, n_embd=24, bias=bias,
        position=position, norm=norm, mlp=mlp, qk_norm=qk_norm, tie_embeddings=tie,
    )  # fmt: skip
    assert parameter_count(config) == GPT(config).num_params()


# GPT-2 small: 124M parameters, about 2 GB for weights, gradients and AdamW.
GPT2_SMALL = GPTConfig(vocab_size=50304, bias=True)


def test_an_untied_output_layer_counts_a_second_vocabulary_matrix():
    tied = GPT2_SMALL
    untied = attrs.evolve(GPT2_SMALL, tie_embeddings=False)
    assert parameter_count(untied) - parameter_count(tied) == 50304 * 768


@pytest.fixture
def gpu_with_free_memory(monkeypatch):
    """torch reports an 80 GB GPU of which only ``free`` bytes are free (another process holds the rest)."""

    def install(free: int) -> torch.device:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
        monkeypatch.setattr(
            torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB"
        )
        return torch.device("cuda", 0)

    return install


def test_the_check_compares_against_free_gpu_memory(gpu_with_free_memory):
    config = ExperimentConfig(name="x", dataset=PluginSpec(plugin="none"), train=TrainConfig())
    gpt2_small = GPT2_SMALL
    check_memory(config, gpt2_small, gpu_with_free_memory(free=10 * 2**30))
    with pytest.raises(ConfigError) as refused:
        check_memory(config, gpt2_small, gpu_with_free_memory(free=1 * 2**30))
    (line,) = refused.value.problems
    assert line.startswith("model: 124,475,904 parameters need about 1.9 GiB")
    assert "NVIDIA A100-SXM4-80GB has free only 1.0 GiB" in line


def test_the_check_counts_an_untied_head(gpu_with_free_memory):
    config = ExperimentConfig(name="x", dataset=PluginSpec(plugin="none"), train=TrainConfig())
    # 163M parameters untied: 2.4 GiB needed, more than 2.1 GiB free; tied (124M) fits.
    device = gpu_with_free_memory(free=int(2.1 * 2**30))
    check_memory(config, GPT2_SMALL, device)
    with pytest.raises(ConfigError, match=r"163,\d{3},\d{3} parameters"):
        check_memory(config, attrs.evolve(GPT2_SMALL, tie_embeddings=False), device)
