"""The memory estimate: the exact parameter count of every shape, against free memory."""

from __future__ import annotations

import itertools

import attrs
import pytest
import torch

from nanogpt_core.config.experiment import ExperimentConfig, PluginSpec, TrainConfig
from nanogpt_core.errors import ConfigError
from nanogpt_core.model.gpt import GPT, GPTConfig
from nanogpt_core.train.memory import (
    activation_bytes,
    estimate_training_memory,
    human_bytes,
    parameter_count,
)
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
    train = TrainConfig(batch_size=1)
    config = ExperimentConfig(name="x", dataset=PluginSpec(plugin="none"), train=train)
    estimate = estimate_training_memory(GPT2_SMALL, batch_size=1, precision="bf16")
    assert estimate.weights + estimate.gradients + estimate.optimizer == 124_475_904 * 16
    check_memory(config, GPT2_SMALL, gpu_with_free_memory(free=10 * 2**30), "bf16")
    with pytest.raises(ConfigError) as refused:
        check_memory(config, GPT2_SMALL, gpu_with_free_memory(free=1 * 2**30), "bf16")
    (line,) = refused.value.problems
    assert line.startswith(
        "model: 124,475,904 parameters and micro-batches of 1 x 1024 tokens need about "
        f"{human_bytes(estimate.total)} (1.9 GiB for weights, gradients and optimizer state, "
        f"{human_bytes(estimate.activations)} for activations), "
        "but NVIDIA A100-SXM4-80GB has free only 1.0 GiB; lower train.batch_size"
    )


def test_the_check_counts_an_untied_head(gpu_with_free_memory):
    train = TrainConfig(batch_size=1)
    config = ExperimentConfig(name="x", dataset=PluginSpec(plugin="none"), train=train)
    untied = attrs.evolve(GPT2_SMALL, tie_embeddings=False)
    tied_total = estimate_training_memory(GPT2_SMALL, batch_size=1, precision="bf16").total
    untied_total = estimate_training_memory(untied, batch_size=1, precision="bf16").total
    # An untied head is a second 50304 x 768 matrix: its weights, gradients and AdamW state.
    assert untied_total - tied_total >= 50304 * 768 * 16
    device = gpu_with_free_memory(free=(tied_total + untied_total) // 2)
    check_memory(config, GPT2_SMALL, device, "bf16")
    with pytest.raises(ConfigError, match=r"163,\d{3},\d{3} parameters"):
        check_memory(config, untied, device, "bf16")


def test_the_check_counts_activations(gpu_with_free_memory):
    """A micro-batch too large for the device is refused, although the weights fit."""
    device = gpu_with_free_memory(free=40 * 2**30)
    for batch, fits in ((1, True), (64, False)):
        train = TrainConfig(batch_size=batch)
        config = ExperimentConfig(name="x", dataset=PluginSpec(plugin="none"), train=train)
        if fits:
            check_memory(config, GPT2_SMALL, device, "bf16")
            continue
        with pytest.raises(ConfigError, match="micro-batches of 64 x 1024 tokens") as refused:
            check_memory(config, GPT2_SMALL, device, "bf16")
        assert "with train.activation_checkpointing = true" in refused.value.problems[0]
    # Recomputed activations are counted, and no longer suggested once on.
    train = TrainConfig(batch_size=64, activation_checkpointing=True)
    config = ExperimentConfig(name="x", dataset=PluginSpec(plugin="none"), train=train)
    with pytest.raises(ConfigError) as refused:
        check_memory(config, GPT2_SMALL, gpu_with_free_memory(free=10 * 2**30), "bf16")
    assert "activation_checkpointing" not in refused.value.problems[0]
    # 50 GiB: 64 x 1024 tokens need about 60 GiB, about 43 GiB recomputed.
    check_memory(config, GPT2_SMALL, gpu_with_free_memory(free=50 * 2**30), "bf16")
    with pytest.raises(ConfigError):
        check_memory(
            attrs.evolve(config, train=TrainConfig(batch_size=64)),
            GPT2_SMALL,
            gpu_with_free_memory(free=50 * 2**30),
            "bf16",
        )


def saved_bytes(config: GPTConfig, batch: int, precision: str, checkpointed: bool = False) -> int:
    """What autograd keeps for the backward pass of one micro-step, counted exactly."""
    model = GPT(config)
    model.activation_checkpointing = checkpointed
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randint(0, config.vocab_size, (batch, config.block_size))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(x, x)
    return sum(kept.values())


BLOCKS = [
    {},
    {"position": "rope"},
    {"norm": "rmsnorm"},
    {"mlp": "swiglu"},
    {"mlp": "relu2"},
    {"qk_norm": True},
    {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "bias": False},
]


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("options", BLOCKS, ids=lambda o: "-".join(o) or "gpt2")
def test_what_a_block_keeps_for_the_backward_pass_is_estimated(precision, options):
    """Two more blocks add what autograd really keeps for them: within 5 % for each option
    alone; the options together share a little (10 %)."""
    shape = {"block_size": 256, "vocab_size": 64, "n_head": 4, "n_embd": 256, **options}
    one, three = GPTConfig(n_layer=1, **shape), GPTConfig(n_layer=3, **shape)
    measured = saved_bytes(three, 2, precision) - saved_bytes(one, 2, precision)
    if precision != "no":  # autocast's 16-bit weight copies are counted apart, as 2 N
        measured -= 2 * (parameter_count(three) - parameter_count(one))
    estimated = activation_bytes(three, 2, precision) - activation_bytes(one, 2, precision)
    tolerance = 0.05 if len(options) <= 1 else 0.10
    assert abs(estimated / measured - 1) < tolerance, (estimated / measured, estimated, measured)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_with_activation_checkpointing_a_block_keeps_its_input_only(precision):
    """Each block keeps its float32 input, 4 C bytes a token; one block's tensors come back
    while it is recomputed (the backward working set the estimate adds once)."""
    shape = {"block_size": 256, "vocab_size": 64, "n_head": 4, "n_embd": 256}
    one, three = GPTConfig(n_layer=1, **shape), GPTConfig(n_layer=3, **shape)
    measured = saved_bytes(three, 2, precision, True) - saved_bytes(one, 2, precision, True)
    # Not even autocast's 16-bit weight copies are kept: they are cast again when recomputed.
    assert measured == 2 * 4 * 256 * (2 * 256)  # two blocks, 4 C bytes, 512 tokens
    estimated = activation_bytes(three, 2, precision, checkpointed=True) - activation_bytes(
        one, 2, precision, checkpointed=True
    )
    assert estimated == measured
    plain, checkpointed = (
        estimate_training_memory(GPT2_SMALL, batch_size=12, precision="bf16", **option).activations
        for option in ({}, {"activation_checkpointing": True})
    )
    # The output layer's logits stay (4 V + 8 V a token): they dominate at GPT-2 small.
    assert checkpointed < 0.75 * plain


def test_a_huge_batch_is_refused_before_anything_is_allocated(
    tiny_char_experiment, session_data_dir, tmp_path
):
    """``--set train.batch_size=1000000000`` once took the machine's memory until it was killed."""
    import subprocess
    import sys

    path = tiny_char_experiment()
    done = subprocess.run(
        [sys.executable, "-m", "nanogpt_core", "run", str(path), "--data-dir", str(session_data_dir),
         "--set", "train.batch_size=1000000000"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert "parameters and micro-batches of 1000000000 x" in line
    assert "this machine has available only" in line and "lower train.batch_size" in line
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "results").rglob("*.pth"))


# Three shapes: the vocabulary dominates (GPT-2's width and vocabulary), the
# blocks dominate (a char model), and Llama's options at a middling vocabulary.
PEAK_SHAPES = {
    "gpt2-vocab": (2, 768, 12, 50304, 1024, 4, {}),
    "char-blocks": (6, 384, 6, 65, 256, 64, {}),
    "llama-options": (
        4, 256, 4, 8192, 512, 16,
        {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True},
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("shape", list(PEAK_SHAPES))
def test_the_activation_estimate_is_within_a_quarter_of_a_measured_peak(shape, precision):
    """The estimate against the peak resident memory of a real CPU micro-step."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    layers, embd, heads, vocab, block, batch, options = PEAK_SHAPES[shape]
    probe = Path(__file__).with_name("memory_probe.py")
    args = [layers, embd, heads, vocab, block, batch, precision, json.dumps(options)]
    done = subprocess.run(
        [sys.executable, str(probe), *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])["activations"]
    config = GPTConfig(
        n_layer=layers, n_embd=embd, n_head=heads, vocab_size=vocab, block_size=block, **options
    )
    estimate = estimate_training_memory(config, batch_size=batch, precision=precision)
    ratio = measured / estimate.activations
    assert 0.75 < ratio < 1.25, f"measured / estimated = {ratio:.2f}"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_optimizer_state_of_many_blocks_is_extended_from_one_and_two(
    optimizer, installed_plugins
):
    from nanogpt_core.train.memory import _measured_state_bytes, optimizer_state_bytes
    from nanogpt_core.train.optimization import make_optimizer

    train = TrainConfig(optimizer=optimizer)
    config = GPTConfig(n_layer=5, n_head=2, n_embd=32, block_size=16, vocab_size=64)

    def build(model):
        return make_optimizer(installed_plugins, train, model, "meta")

    # Measured whole, five blocks; the public function measures one and two.
    direct = _measured_state_bytes(config, build)
    assert optimizer_state_bytes(config, build) == direct
    assert direct > 0
