"""The built-in ``alpaca`` template: Stanford's prompts exactly, and the same through transformers."""

from __future__ import annotations

import pytest

from nanogpt_core import NanoGPTError, template_from_description
from nanogpt_plugins.templates.alpaca import AlpacaTemplate
from nanogpt_plugins.tokenizers.gpt2 import GPT2Tokenizer

# Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca, train.py), written out.
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def test_prompts_are_stanfords_exactly():
    template = AlpacaTemplate()
    assert template.prompt("Add the numbers.", "2, 3") == WITH_INPUT.format(
        instruction="Add the numbers.", input="2, 3"
    )
    assert template.prompt("What is AI?") == WITHOUT_INPUT.format(instruction="What is AI?")
    assert template.prompt("What is AI?", "") == template.prompt("What is AI?")


def test_register_templates_built_in_comes_from_its_entry_point(installed_plugins):
    registration = installed_plugins.templates()["alpaca"]
    assert registration.plugin == "alpaca_template"
    assert registration.factory is AlpacaTemplate


def test_description_rebuilds_the_template(installed_plugins):
    description = AlpacaTemplate().description()
    assert description == {"kind": "alpaca"}
    rebuilt = template_from_description(description, installed_plugins)
    assert rebuilt.prompt("Hi", "x") == AlpacaTemplate().prompt("Hi", "x")
    with pytest.raises(NanoGPTError, match="template 'vicuna' is not installed"):
        template_from_description({"kind": "vicuna"}, installed_plugins)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """GPT-2's tokenizer as `gpt export` writes it, loaded by transformers, with our chat template."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("hf")
    GPT2Tokenizer().export_hf(folder, model_max_length=1024)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = AlpacaTemplate().chat_template()
    return tokenizer


def render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_chat_template_renders_one_instruction_as_the_prompt(hf_tokenizer):
    template = AlpacaTemplate()
    for instruction in ("What is AI?", 'Quote "this" {{ not jinja }}\nand a newline.'):
        messages = [{"role": "user", "content": instruction}]
        assert render(hf_tokenizer, messages, add_generation_prompt=True) == template.prompt(
            instruction
        )
    with_input = [{"role": "user", "content": "Add the numbers.", "input": "2, 3"}]
    rendered = render(hf_tokenizer, with_input, add_generation_prompt=True)
    assert rendered == template.prompt("Add the numbers.", "2, 3")


def test_chat_template_renders_earlier_turns_as_training_examples(hf_tokenizer):
    template = AlpacaTemplate()
    messages = [
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "2."},
        {"role": "user", "content": "And 2+2?"},
    ]
    rendered = render(hf_tokenizer, messages, add_generation_prompt=True)
    first = template.prompt("What is 1+1?") + "2.<|endoftext|>"
    assert rendered == first + template.prompt("And 2+2?")
    # The same ids as encoding the text ourselves: the template adds no special tokens.
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    ours = GPT2Tokenizer()
    assert ids == [
        *ours.encode(template.prompt("What is 1+1?") + "2."),
        ours.eot_id,
        *ours.encode(template.prompt("And 2+2?")),
    ]
