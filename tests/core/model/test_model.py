"""The GPT model: GPT-2 initialisation, loss masking, generation, Hugging Face parity."""

from __future__ import annotations

import math

import pytest
import torch

from nanogpt_core.model.gpt import GPT, GPTConfig
from nanogpt_core.model.hf_gpt2 import (
    config_from_hf,
    from_hf_state_dict,
    hf_config_dict,
    to_hf_state_dict,
)

TINY = GPTConfig(
    block_size=32, vocab_size=96, n_layer=3, n_head=4, n_embd=48, dropout=0.0, bias=True
)


def test_embeddings_are_tied_and_init_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=64, vocab_size=512, n_layer=8, n_head=4, n_embd=256, bias=False)
    )
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = model.transformer.h[0].attn.c_proj.weight
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert fc.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].ln_1.bias is None


def test_parameter_counts():
    model = GPT(TINY)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total
    assert model.num_params(non_embedding=True) == total - 96 * 48 - 32 * 48


def test_targets_of_minus_one_take_no_loss():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, 96, (2, 16))
    y = torch.randint(0, 96, (2, 16))
    masked = y.clone()
    masked[:, :8] = -1
    nothing, loss = model(x, masked)
    assert nothing is None  # training gets the loss alone: no (B, T, V) tensor kept alive
    logits = model.head_logits(model.hidden(x))
    expected = torch.nn.functional.cross_entropy(
        logits[:, 8:].reshape(-1, 96), y[:, 8:].reshape(-1)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_without_targets_only_the_last_position_is_computed():
    model = GPT(TINY).eval()
    logits, loss = model(torch.randint(0, 96, (3, 10)))
    assert logits.shape == (3, 1, 96) and loss is None


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="longer than block_size"):
        GPT(TINY)(torch.zeros(1, 33, dtype=torch.long))


def test_greedy_generation_is_deterministic_and_crops_context():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    prompt = torch.randint(0, 96, (1, 30))
    a = model.generate(prompt, 10, temperature=0)
    b = model.generate(prompt, 10, temperature=0)
    assert a.shape == (1, 40) and torch.equal(a, b)
    # The 40-token result was produced with a 32-token window at the end.
    sampled = model.generate(
        prompt, 5, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1)
    )
    assert sampled.shape == (1, 35)


def tiny_hf_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=96,
        n_positions=32,
        n_embd=48,
        n_layer=3,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_hf_weights_load_into_ours_with_the_same_logits():
    hf = tiny_hf_model()
    ours = GPT(config_from_hf(hf.config.to_dict())).eval()
    from_hf_state_dict(ours, hf.state_dict())
    x = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        diff = (hf(x).logits - ours.head_logits(ours.hidden(x))).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_our_weights_load_into_hf_with_the_same_logits(bias):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    ours = GPT(
        GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=48, bias=bias)
    ).eval()
    config = transformers.GPT2Config(
        **{**hf_config_dict(ours.config), "bos_token_id": 0, "eos_token_id": 0}
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    result = hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in result.missing_keys)
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        diff = (hf(x).logits - ours.head_logits(ours.hidden(x))).abs().max().item()
    assert diff < 1e-4
