"""Activation checkpointing: the same losses and gradients, fewer tensors kept for the backward pass."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nanogpt_core import Callback, hookimpl
from nanogpt_core.model.config import GPTConfig
from nanogpt_core.model.gpt import GPT
from nanogpt_core.plugins.registry import load_plugins

SHAPES = {
    "gpt2": {},
    # RoPE past block_size: the rotation and the sliding-window mask go through the checkpoint.
    "llama": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},
}


def counted_backward(
    model: GPT, idx: torch.Tensor, seed: int
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """One forward and backward pass: the loss, the tensors autograd kept, the random state after."""
    kept = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += 1
        return tensor

    torch.manual_seed(seed)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
    loss.backward()
    return loss, kept, torch.get_rng_state()


@pytest.mark.parametrize("shape", SHAPES)
def test_losses_and_gradients_are_exactly_those_without_it(shape):
    config = GPTConfig(
        vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=0.1, **SHAPES[shape]
    )
    torch.manual_seed(0)
    plain = GPT(config)
    recomputing = copy.deepcopy(plain)
    recomputing.activation_checkpointing = True
    length = 24 if shape == "llama" else 16
    idx = torch.randint(0, 50, (4, length + 1))
    loss, kept, rng = counted_backward(plain, idx, seed=1)
    loss_ckpt, kept_ckpt, rng_ckpt = counted_backward(recomputing, idx, seed=1)
    assert torch.equal(loss, loss_ckpt)
    for (name, p), q in zip(plain.named_parameters(), recomputing.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    # Each block keeps its input only, instead of a dozen or more tensors.
    assert kept_ckpt < kept / 2
    # Recomputing replays the dropout masks without drawing new ones: the next step's match too.
    assert torch.equal(rng, rng_ckpt)


def test_generation_and_evaluation_never_recompute():
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, 50, (2, 5))
    expected = model.generate(idx, 8, temperature=0)
    model.activation_checkpointing = True
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: pytest.fail("a tensor was saved for a backward pass"), lambda t: t
    ):
        assert torch.equal(model.generate(idx, 8, temperature=0), expected)
    model.train()
    with torch.no_grad():  # evaluation inside a training run: nothing to recompute for
        assert model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())[1].isfinite()


def test_a_run_with_it_logs_the_same_losses(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    seen = []

    class Probe(Callback):
        def on_train_start(self, state):
            seen.append(state.model.activation_checkpointing)

    class Probing:
        @hookimpl
        def register_callbacks(self, register):
            register("probe", lambda options: Probe())

    plugins = load_plugins(disabled=())
    plugins.register(Probing(), name="probing")
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "probe"\n')
    sets = ["train.steps_per_epoch=10", "train.log_every=1", "model.dropout=0.1"]
    sets += ["train.eval_every=10", "train.eval_batches=2"]
    lines = []
    for on in ("false", "true"):
        results = tmp_path / on
        overrides = [*sets, f"train.activation_checkpointing={on}"]
        train_experiment(path, session_data_dir, results, overrides, plugins)
        text = (results / "tiny" / "metrics.jsonl").read_text()
        timing = ("elapsed_s", "tokens_per_sec", "mfu")
        lines.append(
            [
                {k: v for k, v in json.loads(line).items() if k not in timing}
                for line in text.splitlines()
            ]
        )
    assert seen == [False, True]
    assert len(lines[0]) == 10 and lines[0] == lines[1]
