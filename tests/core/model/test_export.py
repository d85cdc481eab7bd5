"""`gpt export`: a Hugging Face GPT-2 or Llama folder that transformers loads with our logits."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from nanogpt_core.cli import make_cli
from nanogpt_core.generate.sampling import load_model
from nanogpt_core.plugins.registry import load_plugins

transformers = pytest.importorskip("transformers")


def export(ckpt, out):
    return CliRunner().invoke(
        make_cli(load_plugins(disabled=())), ["export", "--ckpt", str(ckpt), "--out", str(out)]
    )


def test_bpe_export_loads_in_transformers_with_equal_logits_and_greedy_text(
    bpe_checkpoint, tmp_path
):
    out = tmp_path / "hf"
    result = export(bpe_checkpoint, out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ours = load_model(bpe_checkpoint, "cpu").model
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Once upon a time, there was a little", return_tensors="pt").input_ids
    assert ids[0].tolist()[:3] == [7454, 2402, 257]  # the same ids tiktoken gives
    with torch.no_grad():
        theirs = hf(ids).logits
        mine = ours.head_logits(ours.hidden(ids))
    assert (theirs - mine).abs().max().item() < 1e-4
    hf_greedy = hf.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=50256)
    our_greedy = ours.generate(ids, 20, temperature=0)
    assert torch.equal(hf_greedy, our_greedy)


def test_char_export_keeps_its_vocabulary(char_checkpoint, tmp_path):
    out = tmp_path / "hf"
    assert export(char_checkpoint, out).exit_code == 0
    assert (out / "nanogpt_tokenizer.json").exists()
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ours = load_model(char_checkpoint, "cpu").model
    ids = torch.randint(0, 65, (1, 40))
    with torch.no_grad():
        assert (hf(ids).logits - ours.head_logits(ours.hidden(ids))).abs().max().item() < 1e-4


def test_export_refuses_a_used_folder_and_bad_checkpoints(char_checkpoint, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("keep me")
    result = export(char_checkpoint, used)
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == f"Error: --out {used}: exists and is not an empty folder; choose a new folder"
    )
    assert (used / "x").read_text() == "keep me"
    config = char_checkpoint.parent.parent / "config.json"
    result = export(config, tmp_path / "new")
    assert result.exit_code == 2 and "not a readable checkpoint" in result.output
    assert not (tmp_path / "new").exists()


def write_checkpoint(path, template, **options):
    """A tiny GPT-2-BPE checkpoint as a fine-tuning run writes it (``template`` None: pre-trained).

    ``options`` are architecture options (GPTConfig fields) of the model.
    """
    import attrs

    from nanogpt_core.model.gpt import GPT, GPTConfig
    from nanogpt_core.train.checkpoints import save_checkpoint

    shape = {"block_size": 32, "vocab_size": 50304, "n_layer": 1, "n_head": 2, "n_embd": 16}
    shape["bias"] = True  # GPT-2's biases, unless ``options`` say otherwise
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**shape, **options}))
    with torch.no_grad():
        # Gains away from 1 and untied matrices apart, so a misplaced tensor shows.
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "model_args": attrs.asdict(model.config),
            "step": 0,
            "tokenizer": {"kind": "gpt2", "name": "gpt2", "vocab_size": 50257, "eot_id": 50256},
            "template": template,
        },
    )
    return path


def test_the_template_becomes_the_chat_template_transformers_applies(tmp_path):
    from nanogpt_core.data.templates import template_from_description

    ckpt = write_checkpoint(tmp_path / "tuned.pth", {"kind": "alpaca"})
    out = tmp_path / "hf"
    result = export(ckpt, out)
    assert result.exit_code == 0, result.output
    template = template_from_description({"kind": "alpaca"})
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)

    def chat(*messages, **options):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, **options)

    for question in ("What is AI?", 'Quote "this", {{ braces }} and ### Response:\n'):
        user = {"role": "user", "content": question}
        assert chat(user, add_generation_prompt=True) == template.prompt(question)
    with_input = {"role": "user", "content": "Add the numbers.", "input": "2 and 3"}
    assert chat(with_input, add_generation_prompt=True) == template.prompt(
        "Add the numbers.", "2 and 3"
    )
    # Earlier turns render as gpt chat keeps them: prompt + answer + <|endoftext|>.
    turns = [
        {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "Machines that think."},
        {"role": "user", "content": "And 1+1?"},
    ]
    assert chat(*turns, add_generation_prompt=True) == (
        template.prompt("What is AI?")
        + "Machines that think.<|endoftext|>"
        + template.prompt("And 1+1?")
    )


def test_without_a_template_there_is_no_chat_template_and_unknown_ones_are_refused(tmp_path):
    import json

    out = tmp_path / "pretrained"
    assert export(write_checkpoint(tmp_path / "pre.pth", None), out).exit_code == 0
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    result = export(write_checkpoint(tmp_path / "odd.pth", {"kind": "vicuna"}), tmp_path / "odd")
    assert result.exit_code == 2
    assert result.output.startswith("Error: template 'vicuna' is not installed (installed: ")
    assert len(result.output.splitlines()) == 1
    assert not (tmp_path / "odd").exists()


LLAMA = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}


def equal_logits_and_greedy_text(hf, ckpt, out):
    ours = load_model(ckpt, "cpu").model
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Once upon a time, there was", return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = hf(ids).logits
        mine = ours.head_logits(ours.hidden(ids))
    assert (theirs - mine).abs().max().item() < 1e-4
    hf_greedy = hf.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=50256)
    assert torch.equal(hf_greedy, ours.generate(ids, 20, temperature=0))


@pytest.mark.parametrize("tie", [True, False])
def test_a_llama_shaped_model_exports_as_llama_with_equal_logits_and_greedy_text(tmp_path, tie):
    options = {**LLAMA, "n_layer": 2, "rope_theta": 500.0, "tie_embeddings": tie}
    ckpt = write_checkpoint(tmp_path / "llama.pth", None, **options)
    out = tmp_path / "hf"
    result = export(ckpt, out)
    assert result.exit_code == 0, result.output
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings == tie
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    # The tokenizer is written as for GPT-2 models.
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    equal_logits_and_greedy_text(hf, ckpt, out)


def test_an_untied_gpt2_exports_with_its_own_output_layer(tmp_path):
    ckpt = write_checkpoint(tmp_path / "untied.pth", None, tie_embeddings=False)
    out = tmp_path / "hf"
    assert export(ckpt, out).exit_code == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.lm_head.weight is not hf.transformer.wte.weight
    equal_logits_and_greedy_text(hf, ckpt, out)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({**LLAMA, "qk_norm": True}, "model.qk_norm = true has no equivalent in transformers' "
         "LlamaForCausalLM"),
        ({"mlp": "swiglu"}, 'model.mlp = "swiglu" has no equivalent in transformers\' '
         "GPT2LMHeadModel"),
        ({"logit_softcap": 30.0}, "model.logit_softcap = 30.0 has no equivalent in "
         "transformers' GPT2LMHeadModel"),
        ({"position": "rope"}, 'model.norm = "layernorm", model.mlp = "gelu", model.bias = true '
         "have no equivalent in transformers' LlamaForCausalLM"),
    ],
)  # fmt: skip
def test_other_architectures_are_refused_naming_the_options(tmp_path, options, expected):
    ckpt = write_checkpoint(tmp_path / "odd.pth", None, **options)
    result = export(ckpt, tmp_path / "hf")
    assert result.exit_code == 2
    (line,) = result.output.splitlines()
    assert line.startswith(f"Error: --ckpt {ckpt}: {expected}; gpt export writes GPT-2's options")
    assert not (tmp_path / "hf").exists()
