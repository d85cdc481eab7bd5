"""The ``muon`` optimizer: its parameter split, its updates against torch's own, its state."""

from __future__ import annotations

import copy

import pytest
import torch

from nanogpt_core.config.experiment import TrainConfig
from nanogpt_core.model.gpt import GPT, GPTConfig
from nanogpt_plugins.optimizers.muon import Muon, MuonOptions

TRAIN = TrainConfig(learning_rate=3e-3, weight_decay=0.1, beta1=0.8, beta2=0.99)
# The split docs/training.md gives, for a 2-layer model: Muon for the 2-D weights of the blocks ...
MUON = [
    f"transformer.h.{i}.{name}.weight"
    for i in range(2)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]
# ... AdamW for the embeddings (the tied head is wte) and every 1-D tensor.
EMBED = ["transformer.wte.weight", "transformer.wpe.weight"]
VECTORS = [f"transformer.h.{i}.{n}.weight" for i in range(2) for n in ("ln_1", "ln_2")] + [
    "transformer.ln_f.weight"
]


def tiny_gpt(bias: bool = False) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=bias)
    return GPT(config)


def names_by_group(optimizer) -> list[tuple[str, float, float, list[str]]]:
    return [
        (part, g["peak_lr"], g["weight_decay"], g["param_names"])
        for part, opt in optimizer.parts.items()
        for g in opt.param_groups
    ]


def test_the_split_is_the_documented_one():
    model = tiny_gpt()
    options = MuonOptions(lr=0.05, weight_decay=0.01, embed_lr=0.3)
    optimizer = Muon(options).build(model, TRAIN, "cpu")
    assert names_by_group(optimizer) == [
        ("muon", 0.05, 0.01, MUON),
        ("adamw", 0.3, 0.1, EMBED),
        ("adamw", 3e-3, 0.0, VECTORS),
    ]
    assert optimizer.param_groups == [g for o in optimizer.parts.values() for g in o.param_groups]


def test_biases_and_an_untied_head_go_to_adamw():
    model = tiny_gpt(bias=True)
    model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    optimizer = Muon(MuonOptions(head_lr=0.01)).build(model, TRAIN, "cpu")
    groups = {(part, lr): names for part, lr, _, names in names_by_group(optimizer)}
    assert groups[("muon", 0.02)] == MUON
    assert groups[("adamw", 0.01)] == ["lm_head.weight"]
    vectors = groups[("adamw", 3e-3)][len(EMBED) :]
    assert "transformer.h.0.attn.c_attn.bias" in vectors
    assert "transformer.h.1.mlp.c_proj.bias" in vectors
    params = dict(model.named_parameters())
    assert all(params[name].dim() == 1 for name in vectors)


def seeded_grads(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator)


def test_updates_equal_torchs_muon_and_adamw_on_the_parameters_each_owns():
    options = MuonOptions(
        lr=0.05,
        momentum=0.9,
        nesterov=False,
        weight_decay=0.1,
        ns_steps=4,
        adjust_lr_fn="match_rms_adamw",
        ns_dtype="bfloat16",
        embed_lr=0.01,
    )
    model = tiny_gpt()
    reference = copy.deepcopy(model)
    optimizer = Muon(options).build(model, TRAIN, "cpu")
    params = dict(reference.named_parameters())
    muon = torch.optim.Muon(
        [params[n] for n in MUON],
        lr=0.05,
        momentum=0.9,
        nesterov=False,
        weight_decay=0.1,
        ns_steps=4,
        adjust_lr_fn="match_rms_adamw",
    )
    adamw = torch.optim.AdamW(
        [
            {"params": [params[n] for n in EMBED], "lr": 0.01, "weight_decay": 0.1},
            {"params": [params[n] for n in VECTORS], "lr": 3e-3, "weight_decay": 0.0},
        ],
        betas=(0.8, 0.99),
    )
    for step in range(3):
        seeded_grads(model, step)
        seeded_grads(reference, step)
        if step == 2:  # the schedule moves every group's lr; both follow
            refs = [*muon.param_groups, *adamw.param_groups]
            for group, ref in zip(optimizer.param_groups, refs, strict=True):
                group["lr"] = ref["lr"] = group["lr"] / 2
        optimizer.step()
        muon.step()
        adamw.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        assert torch.equal(param, params[name]), name
    assert not torch.equal(
        model.transformer.h[0].mlp.c_fc.weight, tiny_gpt().transformer.h[0].mlp.c_fc.weight
    )


def test_state_survives_a_weights_only_save_and_load(tmp_path):
    model = tiny_gpt()
    optimizer = Muon(MuonOptions()).build(model, TRAIN, "cpu")
    for step in range(2):
        seeded_grads(model, step)
        optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
    resumed_model = copy.deepcopy(model)
    resumed = Muon(MuonOptions()).build(resumed_model, TRAIN, "cpu")
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    # The groups are still the parts' own: setting an lr here sets it in the part.
    assert resumed.param_groups[0] is resumed.parts["muon"].param_groups[0]
    assert resumed.param_groups[-1] is resumed.parts["adamw"].param_groups[-1]
    for step in (2, 3):
        for m, o in ((model, optimizer), (resumed_model, resumed)):
            seeded_grads(m, step)
            o.param_groups[0]["lr"] = 0.01
            o.step()
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert set(resumed.state) == set(resumed_model.parameters())  # every part's, one view
    with pytest.raises(ValueError, match="saved by another optimizer"):
        resumed.load_state_dict({"adamw": {}})


def test_a_grad_scaler_unscales_and_checks_every_group():
    model = tiny_gpt()
    reference = copy.deepcopy(model)
    optimizer = Muon(MuonOptions()).build(model, TRAIN, "cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    _, loss = model(x, x)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    _, ref_loss = reference(x, x)
    ref_loss.backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    scaler.step(optimizer)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    # An inf in a Muon matrix's gradient skips the step of every part.
    _, loss = model(x, x)
    scaler.scale(loss).backward()
    model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")
    scaler.step(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rule", ["original", "match_rms_adamw"])
def test_the_twin_is_torchs_muon_with_its_iteration_in_another_dtype(monkeypatch, rule, dtype):
    import functools

    import torch.optim._muon as torch_muon

    from nanogpt_plugins.optimizers.muon_float32 import CastMuon, Float32Muon, orthogonalize

    # torch's own step, its Newton-Schulz iteration made float32 (or float16): then the two
    # agree exactly.
    iteration = functools.partial(orthogonalize, dtype=dtype)
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", iteration)
    model, reference = tiny_gpt(), tiny_gpt()
    mine = CastMuon(
        [p for n, p in model.named_parameters() if n in MUON],
        ns_dtype=dtype,
        lr=0.05,
        adjust_lr_fn=rule,
    )
    params = dict(reference.named_parameters())
    theirs = torch.optim.Muon([params[n] for n in MUON], lr=0.05, adjust_lr_fn=rule)
    for step in range(3):
        seeded_grads(model, step)
        seeded_grads(reference, step)
        mine.step()
        theirs.step()
    for name, param in model.named_parameters():
        if name in MUON:
            assert torch.equal(param, params[name]), name
    # The state dict is torch's own: a checkpoint of a V100 run resumes on an A100.
    assert mine.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
    assert mine.state_dict()["state"].keys() == theirs.state_dict()["state"].keys()
    assert Float32Muon is CastMuon  # its first name still imports, float32 by default


def real_gradients(n_embd: int, n_head: int) -> dict[str, torch.Tensor]:
    """The block matrices' gradients after one backward pass of a 1-layer GPT."""
    torch.manual_seed(0)
    config = GPTConfig(
        block_size=32, vocab_size=64, n_layer=1, n_head=n_head, n_embd=n_embd, bias=True
    )
    model = GPT(config)
    tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))
    _, loss = model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if n in MUON[:4]}


def test_the_float16_iteration_is_close_to_float32_and_closer_than_torchs_bfloat16():
    """A V100's float16 iteration, against float32, on real gradients of GPT-2 small's shapes.

    Shapes: c_attn (3C, C) and c_fc (4C, C) tall, attn c_proj (C, C), mlp c_proj
    (C, 4C) wide, for C = 64 and 768. Measured max abs differences from float32:
    1.2e-3 to 3.2e-3 (entries up to 0.39), against 8e-3 to 3.1e-2 for torch's
    bf16 iteration, which A100s run. Tolerance 1e-2: three times the largest
    measured. Gradients scaled by 1e-4 (entries ~1e-6, as late in training) give
    the same: the matrix is normalised before it is cast, or float16 would flush
    them to zero (a cast first measured 0.1 to 0.38 off).
    """
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS

    from nanogpt_plugins.optimizers.muon_float32 import orthogonalize

    coefficients = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    shapes = []
    for n_embd, n_head in ((64, 2), (768, 12)):
        for name, grad in real_gradients(n_embd, n_head).items():
            shapes.append(tuple(grad.shape))
            exact = orthogonalize(grad, coefficients, 5, EPS)
            bf16_error = (torch_muon_iteration(grad).float() - exact).abs().max()
            for scale in (1.0, 1e-4):
                half = orthogonalize(grad * scale, coefficients, 5, EPS, torch.float16)
                assert half.dtype == torch.float16
                error = (half.float() - exact).abs().max()
                assert error < 1e-2, (name, scale, error)
                assert error < bf16_error / 2, (name, scale, error, bf16_error)
    assert {(768, 3072), (3072, 768), (64, 256), (256, 64)} <= set(shapes)


def torch_muon_iteration(grad: torch.Tensor) -> torch.Tensor:
    """torch.optim.Muon's own bf16 Newton-Schulz iteration, with its defaults."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

    return _zeropower_via_newtonschulz(grad, (DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, EPS)


def fake_gpu(monkeypatch, capability: tuple[int, int] | None) -> None:
    """torch's own device queries answering as a GPU of this compute capability would.

    ``None``: no GPU. Every GPU also says yes to ``is_bf16_supported`` (a V100
    emulates bf16), which ``auto`` must not believe.
    """
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    if capability is None:
        return
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.mark.parametrize(
    "gpu, device_type, iteration",
    [
        ((8, 0), "cuda", torch.bfloat16),  # A100: bf16 matrix units, torch's Muon itself
        ((9, 0), "cuda", torch.bfloat16),  # H100
        ((7, 0), "cuda", torch.float16),  # V100: fp16 tensor cores only
        ((7, 5), "cuda", torch.float16),  # T4
        ((6, 0), "cuda", torch.float32),  # P100: no tensor cores
        (None, "cpu", torch.float32),  # bf16 matmuls emulated, ~20x slower than float32
    ],
)
def test_auto_picks_the_iteration_dtype_by_compute_capability(
    monkeypatch, gpu, device_type, iteration
):
    fake_gpu(monkeypatch, gpu)
    optimizer = Muon(MuonOptions()).build(tiny_gpt(), TRAIN, device_type)
    muon = optimizer.parts["muon"]
    if iteration == torch.bfloat16:
        assert type(muon) is torch.optim.Muon
    else:
        assert type(muon) is not torch.optim.Muon
        assert muon.ns_dtype == iteration
    # AdamW's fused kernel on CUDA, as the adamw optimizer has it.
    assert optimizer.parts["adamw"].defaults["fused"] is (True if device_type == "cuda" else None)


@pytest.mark.parametrize(
    "ns_dtype, iteration",
    [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)],
)
@pytest.mark.parametrize("gpu, device_type", [((7, 0), "cuda"), ((8, 0), "cuda"), (None, "cpu")])
def test_an_explicit_ns_dtype_is_used_on_any_device(
    monkeypatch, ns_dtype, iteration, gpu, device_type
):
    fake_gpu(monkeypatch, gpu)
    muon = Muon(MuonOptions(ns_dtype=ns_dtype)).build(tiny_gpt(), TRAIN, device_type).parts["muon"]
    assert getattr(muon, "ns_dtype", torch.bfloat16) == iteration
    assert (type(muon) is torch.optim.Muon) == (iteration == torch.bfloat16)


@pytest.mark.parametrize(
    ("value", "accepted"), [(0.0, True), (0.95, True), (1.0, False), (5, False)]
)
def test_momentum_has_the_range_momentum_has(value, accepted, write_toml, installed_plugins):
    """``momentum = 5`` was accepted; a momentum is a fraction in [0, 1)."""
    from nanogpt_core.config.experiment_file import load_experiment
    from nanogpt_core.errors import ConfigError

    text = f'[dataset]\nplugin = "shakespeare"\n[train]\noptimizer = "muon"\n[train.muon]\nmomentum = {value}\n'
    path = write_toml("exp.toml", text)
    if accepted:
        assert (
            load_experiment(path, [], installed_plugins).train.plugin_options["muon"].momentum
            == value
        )
        return
    with pytest.raises(ConfigError) as caught:
        load_experiment(path, [], installed_plugins)
    assert caught.value.problems == [
        f"{path}: train.muon.momentum: must be in [0, 1), got {float(value)!r}"
    ]
