"""Linear layers prepacked for oneDNN: the same outputs as ``nn.Linear``, or nothing packed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nanogpt_core.model import packed_linear
from nanogpt_core.model.gpt import GPT, GPTConfig
from nanogpt_core.model.packed_linear import PackedLinear, can_pack, pack_linears

SHAPES = {
    "gpt2": {"bias": True},
    "llama": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},
}
# What prepacked products may differ from F.linear's by (float32 sums in another order).
TOLERANCE = 1e-5

pytestmark = pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.float32), reason="this torch has no oneDNN linear"
)


def tiny(shape: str) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=48, **SHAPES[shape]
    )
    return GPT(config).eval()


def linears(model: nn.Module) -> int:
    return sum(type(m) is nn.Linear for m in model.modules())


@pytest.mark.parametrize("shape", list(SHAPES))
def test_packed_model_gives_the_same_logits_for_any_number_of_rows(shape):
    model = tiny(shape)
    packed = copy.deepcopy(model)
    count = linears(model)
    assert pack_linears(packed, rows=8) == count
    assert linears(packed) == 0
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == count
    # The tied output layer is packed; the embedding still looks up the same weight.
    assert torch.equal(packed.transformer.wte.weight, model.lm_head.weight)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for rows in (1, 2, 8, 13):
            idx = torch.randint(0, 96, (rows, 7), generator=g)
            want, _ = model(idx)
            got, _ = packed(idx)
            assert got.shape == want.shape
            assert (got - want).abs().max().item() < TOLERANCE
        # A strided view, as the decode step hands the output layer the last position.
        hidden = torch.randn(5, 3, 48, generator=g)
        want = model.head_logits(hidden[:, -1, :])
        got = packed.head_logits(hidden[:, -1, :])
        assert (got - want).abs().max().item() < TOLERANCE


def test_nothing_is_packed_off_float32_or_without_the_operators(monkeypatch):
    model = tiny("gpt2").double()
    assert pack_linears(model, rows=8) == 0
    assert linears(model) == linears(tiny("gpt2"))
    model = tiny("gpt2")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not can_pack(torch.device("cpu"), torch.float32)
    assert pack_linears(model, rows=8) == 0
    assert linears(model) == linears(tiny("gpt2"))


def test_a_layer_whose_probe_disagrees_leaves_the_whole_model_unpacked(monkeypatch):
    model = tiny("gpt2")
    before = {name: type(m) for name, m in model.named_modules()}
    real_forward = PackedLinear.forward
    calls = []

    def wrong_for_the_third(self, x):
        calls.append(1)
        out = real_forward(self, x)
        return out + 1.0 if len(calls) == 3 else out

    monkeypatch.setattr(PackedLinear, "forward", wrong_for_the_third)
    assert pack_linears(model, rows=4) == 0
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert len(calls) == 3  # it stopped at the layer that disagreed


def test_subclasses_of_linear_are_left_alone():
    class Adapter(nn.Linear):
        """A plugin's layer with its own forward (a LoRA adapter, say)."""

    model = tiny("gpt2")
    model.transformer.h[0].mlp.c_fc = Adapter(48, 4 * 48)
    packed = pack_linears(model, rows=8)
    assert packed == linears(tiny("gpt2")) - 1
    assert type(model.transformer.h[0].mlp.c_fc) is Adapter


def test_probe_tolerance_catches_a_wrong_layout():
    # The probe's check is what keeps a broken operator from serving wrong logits.
    linear = nn.Linear(48, 64)
    packed = PackedLinear(linear, rows=8)
    assert packed_linear._matches(linear, packed)
    shuffled = nn.Linear(48, 64)
    with torch.no_grad():
        shuffled.weight.copy_(linear.weight.flip(0))
        shuffled.bias.copy_(linear.bias)
    assert not packed_linear._matches(shuffled, packed)
