"""The `[model]` architecture options: RoPE, RMSNorm, SwiGLU/ReLU², qk-norm, untied head, softcap.

Each combination trains through the real Trainer; the defaults stay GPT-2's
weights; the KV cache equals recomputation with RoPE past `block_size`; older
checkpoints (without the options) still load; bad combinations are one line.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch
from click.testing import CliRunner

from nanogpt_core.cli import make_cli
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.errors import NanoGPTError
from nanogpt_core.generate.sampling import load_model
from nanogpt_core.model.gpt import GPT, GPTConfig, KVCache, mlp_hidden_size
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.checkpoints import load_checkpoint, save_checkpoint
from nanogpt_core.train.resume import mismatches
from nanogpt_core.train.run import run_experiment

SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
LLAMA = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
NEW_OPTIONS = (
    "position",
    "rope_theta",
    "norm",
    "mlp",
    "qk_norm",
    "tie_embeddings",
    "logit_softcap",
)
# Together these use every value of every option at least once.
COMBINATIONS = {
    "llama_untied": {**LLAMA, "tie_embeddings": False},
    "rope_relu2_qk_softcap": {
        "position": "rope",
        "rope_theta": 500.0,
        "mlp": "relu2",
        "qk_norm": True,
        "logit_softcap": 15.0,
    },
    "learned_rmsnorm_swiglu_qk": {"norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True},
}


def toml_value(value):
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def train(path, data_dir, results_dir, overrides=()):
    plugins = load_plugins(disabled=())
    config = load_experiment(path, overrides, plugins)
    run_experiment(config, plugins, results_dir=results_dir, data_dir=data_dir, progress=False)
    return results_dir / config.name


def cli(*args):
    return CliRunner().invoke(make_cli(load_plugins(disabled=())), [str(a) for a in args])


# -- the model ---------------------------------------------------------------------


def test_gpt2s_options_keep_its_state_dict_keys_and_a_llama_has_no_position_weights():
    small = {"block_size": 16, "vocab_size": 64, "n_layer": 1, "n_head": 2, "n_embd": 32}
    small["bias"] = True  # GPT-2 has biases; the other defaults are GPT-2's
    gpt2 = GPT(GPTConfig(**small))
    block = [
        f"ln_1.{w}" for w in ("weight", "bias")
    ] + [  # the names GPT2LMHeadModel has, one to one
        "attn.c_attn.weight",
        "attn.c_attn.bias",
        "attn.c_proj.weight",
        "attn.c_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ]
    assert list(gpt2.state_dict()) == [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        *(f"transformer.h.0.{name}" for name in block),
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        "lm_head.weight",
    ]
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    llama = GPT(GPTConfig(**{**small, **LLAMA}, qk_norm=True, tie_embeddings=False))
    assert sorted(llama.state_dict()) == sorted(
        [
            "transformer.wte.weight",
            "transformer.h.0.ln_1.weight",
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.0.attn.c_proj.weight",
            "transformer.h.0.attn.q_norm.weight",
            "transformer.h.0.attn.k_norm.weight",
            "transformer.h.0.ln_2.weight",
            "transformer.h.0.mlp.c_fc.weight",
            "transformer.h.0.mlp.c_gate.weight",
            "transformer.h.0.mlp.c_proj.weight",
            "transformer.ln_f.weight",
            "lm_head.weight",
        ]
    )
    assert llama.lm_head.weight is not llama.transformer.wte.weight
    # SwiGLU's three matrices are as wide as keeps GELU's parameter count (C = 768: 2048).
    assert mlp_hidden_size(GPTConfig(mlp="swiglu")) == 2048
    assert mlp_hidden_size(GPTConfig(n_embd=32, n_head=2, mlp="swiglu")) == 128


def test_flops_count_the_chosen_shapes():
    L, C, T, V = 2, 64, 32, 128
    base = {"block_size": T, "vocab_size": V, "n_layer": L, "n_head": 4, "n_embd": C}
    swiglu = GPT(GPTConfig(**base, **LLAMA, tie_embeddings=False))
    H = 192  # 8/3 * 64 = 170.7, rounded up to a multiple of 64
    # Per block: q, k, v and the output projection; gate, up and down; two RMSNorm gains.
    block = C * 3 * C + C * C + 3 * C * H + 2 * C
    # The final norm and the untied output layer multiply; the token embedding is a lookup.
    weights = L * block + C + V * C
    assert swiglu.flops_per_token() == 6 * weights + 12 * L * C * T
    gelu = GPT(GPTConfig(**base, bias=False, tie_embeddings=False))
    block = C * 3 * C + C * C + 2 * C * 4 * C + 2 * C
    # Learned positions are a lookup too.
    assert gelu.flops_per_token() == 6 * (L * block + C + V * C) + 12 * L * C * T


def test_softcap_bounds_the_logits():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16, bias=True)
    ).eval()
    capped = GPT(attrs.evolve(model.config, logit_softcap=0.5)).eval()
    capped.load_state_dict(model.state_dict())
    x = torch.randint(0, 32, (1, 8))
    with torch.no_grad():
        raw, capped_logits = (
            model.head_logits(model.hidden(x)),
            capped.head_logits(capped.hidden(x)),
        )
    assert torch.allclose(capped_logits, 0.5 * torch.tanh(raw / 0.5))
    assert capped_logits.abs().max() < 0.5


# -- the KV cache ------------------------------------------------------------------


def rope_model(**options) -> GPT:
    torch.manual_seed(0)
    options = {"position": "rope", **options}
    config = GPTConfig(block_size=8, vocab_size=64, n_layer=2, n_head=2, n_embd=32, **options)
    return GPT(config).eval()


@pytest.mark.parametrize("options", [{}, {**LLAMA, "qk_norm": True, "logit_softcap": 10.0}])
def test_rope_cache_equals_recomputation_within_and_past_block_size(options):
    model = rope_model(**options)
    tokens = torch.randint(0, 64, (2, 40))
    cache = KVCache(model.config)
    with torch.no_grad():
        model(tokens[:, :3], cache=cache)
        for t in range(3, 40):
            step, _ = model(tokens[:, t : t + 1], cache=cache)
            # Recomputed from scratch: sliding windows of block_size in every layer.
            full, _ = model(tokens[:, max(0, t + 1 - model.receptive_field) : t + 1])
            assert torch.allclose(step, full, atol=1e-5), t
        # Past block_size that is not nanoGPT's crop to the last block_size tokens,
        # which would give each token a shorter context in the deeper layers.
        crop, _ = model(tokens[:, -8:])
        assert not torch.allclose(step, crop, atol=1e-3)
    prompt = tokens[:, :5]
    cached = model.generate(prompt, 40, temperature=0)
    recomputed = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert cached.shape == (2, 45) and torch.equal(cached, recomputed)


@pytest.fixture
def cuda_autocast_rms_norm():
    """CPU autocast made to run ``rms_norm`` in float32, as CUDA autocast does.

    CUDA autocast lists ``rms_norm`` among its float32 ops; CPU autocast leaves
    it in bf16. This registers CUDA's rule for it on the CPU's autocast key (torch's
    own ``register_autocast``), for this test only.
    """
    lib = torch.library.Library("aten", "IMPL")
    torch.library.register_autocast("aten::rms_norm", "cpu", torch.float32, lib=lib)
    yield
    lib._destroy()


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_qk_norm_keeps_keys_in_the_compute_dtype_under_autocast(cuda_autocast_rms_norm, position):
    """Under (CUDA's) autocast the KV cache holds keys and values of one dtype, bf16.

    Stands for a GPU run with mixed precision: there q and k left the qk-norm in
    float32 while v stayed half precision, so the cache mixed float32 keys with
    half values and attention got mixed dtypes.
    """
    torch.manual_seed(0)
    config = GPTConfig(
        block_size=8,
        vocab_size=64,
        n_layer=2,
        n_head=2,
        n_embd=32,
        qk_norm=True,
        position=position,
        bias=True,
    )
    model = GPT(config).eval()
    tokens = torch.randint(0, 64, (2, 6))
    cache = KVCache(model.config)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.transformer.h[0].attn.q_norm(torch.ones(16).bfloat16()).dtype == torch.float32
        model(tokens[:, :5], cache=cache)
        logits, _ = model(tokens[:, 5:], cache=cache)
        full, _ = model(tokens)
    assert [(layer.keys.dtype, layer.values.dtype) for layer in cache.layers] == [
        (torch.bfloat16, torch.bfloat16)
    ] * 2
    # The cached step still equals recomputation (measured equal; bf16 allows some rounding).
    torch.testing.assert_close(logits.float(), full[:, -1:].float(), atol=1e-2, rtol=0)


def test_rope_output_reaches_back_exactly_reach_tokens():
    model = rope_model()
    assert model.receptive_field == 2 * 7 + 1
    tokens = torch.randint(0, 64, (1, 30))
    with torch.no_grad():
        base, _ = model(tokens)
        for back, changes in ((model.receptive_field, True), (model.receptive_field + 1, False)):
            edited = tokens.clone()
            edited[0, -back] = (edited[0, -back] + 1) % 64
            assert (not torch.allclose(model(edited)[0], base)) == changes, back


def test_learned_positions_restart_the_cache_from_half_a_window():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=True)
    ).eval()
    tokens = torch.randint(0, 64, (1, 17))
    cache = KVCache(model.config)
    with torch.no_grad():
        model(tokens[:, :16], cache=cache)
        logits, fresh = model.next_logits(tokens, cache)
        assert fresh is not cache and fresh.length == 8
        assert torch.allclose(logits, model(tokens[:, -8:])[0], atol=1e-6)
        full, _ = model(tokens[:, -16:])
        assert torch.allclose(model.next_logits(tokens, None)[0], full)


def test_batched_serving_with_rope_equals_generation_past_block_size():
    from nanogpt_core.data.tokenizers import tokenizer_from_description
    from nanogpt_core.generate.sampling import LoadedModel
    from nanogpt_core.generate.scheduler import run_jobs
    from nanogpt_core.generate.serve_generation import Job, Piece, Sampling

    chars = "abcdefghijklmnopqrstuvwxyz .,!?\n"
    tokenizer = tokenizer_from_description(
        {"kind": "char", "name": "char", "vocab_size": 32, "eot_id": None, "chars": chars}
    )
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32, **LLAMA)
    model = GPT(config).eval()
    loaded = LoadedModel(model, tokenizer, 0, torch.device("cpu"))
    prompts = [tokenizer.encode("hello world"), tokenizer.encode("what a day!")]
    texts = ["", ""]

    def emit(k):
        def take(item):
            if isinstance(item, Piece):
                texts[k] += item.text

        return take

    jobs = [
        Job(ids, Sampling(max_tokens=36, temperature=0.0), emit(k), lambda error: None)
        for k, ids in enumerate(prompts)
    ]
    run_jobs(loaded, jobs)
    for k, ids in enumerate(prompts):
        alone = model.generate(torch.tensor([ids]), 36, temperature=0, use_cache=False)
        assert texts[k] == tokenizer.decode(alone[0, len(ids) :].tolist())


# -- training, sampling, checkpoints -----------------------------------------------


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_each_combination_trains_and_its_checkpoint_keeps_the_options(
    name, tiny_char_experiment, session_data_dir, tmp_path
):
    options = COMBINATIONS[name]
    overrides = [f"model.{key}={toml_value(value)}" for key, value in options.items()]
    overrides += ["train.steps_per_epoch=8", "train.eval_every=8", "train.eval_batches=2"]
    path = tiny_char_experiment(name, extra='\n[[callbacks]]\nplugin = "checkpoint"\n')
    root = train(path, session_data_dir, tmp_path / "results", overrides)
    lines = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    # Untrained, the loss is about ln(128) (65 characters, padded to 128): it learned.
    assert lines[-1]["val_loss"] < math.log(128) - 0.3
    checkpoint = load_checkpoint(root / "checkpoints" / "last.pth", resume=True)
    assert options.items() <= checkpoint["model_args"].items()
    model = load_model(root / "checkpoints" / "last.pth", "cpu").model
    assert all(getattr(model.config, key) == value for key, value in options.items())


@pytest.fixture(scope="module")
def rope_checkpoint(tmp_path_factory, session_data_dir) -> Path:
    """A tiny char-level Llama-shaped model, trained 20 steps with block_size 32."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    folder = tmp_path_factory.mktemp("rope")
    text = SHARED_DATA / "tinyshakespeare" / "input.txt"
    (folder / "rope.toml").write_text(
        f'[dataset]\nplugin = "shakespeare"\npath = "{text}"\n'
        '[model]\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 32\nposition = "rope"\n'
        'norm = "rmsnorm"\nmlp = "swiglu"\n'
        "[train]\nbatch_size = 8\nsteps_per_epoch = 20\nlearning_rate = 3e-3\n"
        "warmup_steps = 2\neval_every = 20\neval_batches = 2\n"
        '[[callbacks]]\nplugin = "checkpoint"\n'
    )
    root = train(folder / "rope.toml", session_data_dir, folder / "results")
    return root / "checkpoints" / "last.pth"


def test_gpt_sample_on_a_rope_checkpoint_goes_past_block_size(rope_checkpoint):
    args = ["sample", "--ckpt", rope_checkpoint, "--prompt", "ROMEO:", "--temperature", "0"]
    result = cli(*args, "--max-new-tokens", "70")
    assert result.exit_code == 0, result.output
    loaded = load_model(rope_checkpoint, "cpu")
    prompt = torch.tensor([loaded.tokenizer.encode("ROMEO:")])
    full = loaded.model.generate(prompt, 70, temperature=0, use_cache=False)
    assert result.output == loaded.tokenizer.decode(full[0].tolist()) + "\n"


def old_format_copy(checkpoint_path: Path, folder: Path) -> Path:
    """The checkpoint as a nanogpt without the architecture options wrote it."""
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    for key in NEW_OPTIONS:
        del checkpoint["model_args"][key]
    checkpoint.pop("checksum")
    old = folder / "old.pth"
    save_checkpoint(old, checkpoint)
    return old


def test_a_checkpoint_from_before_the_options_still_samples_exports_and_inits(
    char_checkpoint, tiny_char_experiment, session_data_dir, tmp_path
):
    old = old_format_copy(char_checkpoint, tmp_path)
    assert "position" not in torch.load(old, weights_only=True)["model_args"]
    loaded = load_checkpoint(old, resume=True)
    assert loaded["model_args"] == load_checkpoint(char_checkpoint)["model_args"]
    sample = ["--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "3"]
    result = cli("sample", "--ckpt", old, *sample)
    assert result.exit_code == 0, result.output
    assert result.output == cli("sample", "--ckpt", char_checkpoint, *sample).output
    assert cli("export", "--ckpt", old, "--out", tmp_path / "hf").exit_code == 0
    current = attrs.asdict(load_model(char_checkpoint, "cpu").model.config)
    # Resume compares the options too: the filled-in defaults are the model it was.
    found = mismatches(
        loaded, model_args=current, tokenizer=loaded["tokenizer"], data_meta=loaded["data"]
    )
    assert found == []
    path = tiny_char_experiment("from_old")
    overrides = [f'model.init_from="{old}"', "train.steps_per_epoch=1", "train.eval_batches=1"]
    train(path, session_data_dir, tmp_path / "results", overrides)


def test_init_from_and_resume_compare_the_options(
    char_checkpoint, tiny_char_experiment, session_data_dir, tmp_path
):
    path = tiny_char_experiment("differs")
    overrides = [f'model.init_from="{char_checkpoint}"', "model.position=rope", "model.mlp=swiglu"]
    with pytest.raises(NanoGPTError) as caught:
        train(path, session_data_dir, tmp_path / "results", overrides)
    assert str(caught.value) == (
        f'model.init_from: model.position = "rope" but {char_checkpoint} has "learned"; '
        f'model.mlp = "swiglu" but {char_checkpoint} has "gelu"'
    )
    saved = load_checkpoint(char_checkpoint, resume=True)
    now = {**saved["model_args"], "qk_norm": True}
    assert mismatches(
        saved, model_args=now, tokenizer=saved["tokenizer"], data_meta=saved["data"]
    ) == ["model.qk_norm = True now, False in the checkpoint"]


def test_init_from_a_rope_checkpoint_may_lengthen_the_context(
    rope_checkpoint, tiny_char_experiment, session_data_dir, tmp_path
):
    path = tiny_char_experiment("longer")
    overrides = [f'model.init_from="{rope_checkpoint}"', "model.block_size=64"]
    overrides += [f"model.{key}={toml_value(value)}" for key, value in LLAMA.items()]
    overrides += ["train.steps_per_epoch=1", "train.eval_batches=1", "train.batch_size=2"]
    root = train(path, session_data_dir, tmp_path / "results", overrides)
    assert (root / "done").exists()


def test_init_from_a_hugging_face_folder_needs_gpt2s_options(
    tiny_char_experiment, session_data_dir, tmp_path
):
    path = tiny_char_experiment("hf_llama")
    folder = tmp_path / "gpt2"
    overrides = [f'model.init_from="{folder}"', "model.norm=rmsnorm", "model.qk_norm=true"]
    with pytest.raises(NanoGPTError) as caught:
        train(path, session_data_dir, tmp_path / "results", overrides)
    assert str(caught.value) == (
        f"model.init_from: {folder}: a Hugging Face folder starts only a GPT-2, and "
        'model.norm = "rmsnorm", model.qk_norm = true have no place in GPT-2; '
        "use GPT-2's options (the defaults) or start from a toolkit checkpoint"
    )


# -- bad combinations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["model.position=rope", "model.n_embd=30", "model.n_head=2"],
            'model.position: "rope" rotates pairs of channels and needs an even head size, '
            "but n_embd / n_head = 30 / 2 = 15",
        ),
        (["model.logit_softcap=0"], "model.logit_softcap: must be greater than 0, got 0.0"),
        (
            ["model.mlp=swish"],
            'model.mlp: expected one of "gelu", "swiglu", "relu2", got "swish"',
        ),
        (["model.qk_norm=1"], "model.qk_norm: expected true or false, got 1"),
    ],
)
def test_bad_combinations_are_one_line_and_exit_2(tmp_path, overrides, expected):
    (tmp_path / "exp.toml").write_text('[dataset]\nplugin = "shakespeare"\n')
    sets = [arg for override in overrides for arg in ("--set", override)]
    result = subprocess.run(
        [sys.executable, "-m", "nanogpt_core", "run", "exp.toml", "--dry-run", *sets],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"Error: exp.toml: {expected}"]
