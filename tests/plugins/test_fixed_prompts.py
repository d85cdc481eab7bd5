"""The fixed_prompts callback: samples per epoch, early refusal, no effect on training."""

from __future__ import annotations

import json

import pytest

from nanogpt_core.errors import NanoGPTError

PROMPTS = (
    '[[callbacks]]\nplugin = "fixed_prompts"\nprompts = ["ROMEO:", "To be"]\nmax_new_tokens = 20\n'
)
SHORT = [
    "train.epochs=2",
    "train.steps_per_epoch=4",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.log_every=1",
]


def test_writes_one_sample_file_per_epoch(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    train_experiment(tiny_char_experiment(extra=PROMPTS), session_data_dir, tmp_path / "r", SHORT)
    folder = tmp_path / "r" / "tiny" / "samples"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_0001.txt", "epoch_0002.txt"]
    text = (folder / "epoch_0002.txt").read_text()
    assert text.startswith("step 8, epoch 2, val loss ")
    assert "--- 'ROMEO:'\nROMEO:" in text and "--- 'To be'\nTo be" in text
    completion = text.split("--- 'ROMEO:'\n", 1)[1].split("\n\n--- ")[0]
    assert len(completion) == len("ROMEO:") + 20  # one character per token


def test_same_seed_gives_the_same_samples(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment(extra=PROMPTS)
    train_experiment(path, session_data_dir, tmp_path / "a", SHORT)
    train_experiment(path, session_data_dir, tmp_path / "b", SHORT)
    a = (tmp_path / "a" / "tiny" / "samples" / "epoch_0001.txt").read_text()
    assert a == (tmp_path / "b" / "tiny" / "samples" / "epoch_0001.txt").read_text()


def test_sampling_does_not_disturb_training(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    train_experiment(
        tiny_char_experiment(extra=PROMPTS), session_data_dir, tmp_path / "with", SHORT
    )
    train_experiment(tiny_char_experiment(), session_data_dir, tmp_path / "without", SHORT)

    def losses(root):
        lines = (root / "tiny" / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["train_loss"], r.get("val_loss")) for r in map(json.loads, lines)]

    assert losses(tmp_path / "with") == losses(tmp_path / "without")


def test_a_prompt_outside_the_vocabulary_is_refused_at_the_start(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment(
        extra='[[callbacks]]\nplugin = "fixed_prompts"\n'
    )  # default: "1+1 is"
    with pytest.raises(
        NanoGPTError,
        match=r"prompts\[1\] = '1\+1 is': character '1' is not in this model's 65-character vocabulary",
    ):
        train_experiment(path, session_data_dir, tmp_path / "r", SHORT)
    assert not (tmp_path / "r" / "tiny" / "metrics.jsonl").exists()


ALPACA_RUN = """
name = "ft"
[dataset]
plugin = "alpaca"
source = "local"
train_files = ["{path}"]
val_fraction = 0.1
[model]
n_layer = 1
n_head = 2
n_embd = 16
block_size = 128
[train]
batch_size = 4
epochs = 1
steps_per_epoch = 2
eval_every = 2
eval_batches = 1
warmup_steps = 1
[[callbacks]]
plugin = "checkpoint"
[[callbacks]]
plugin = "fixed_prompts"
template = true
prompts = ["What is AI?", "What is 1+1?"]
max_new_tokens = 8
temperature = 0
"""


def test_template_asks_instructions_and_shows_the_answers_only(
    shared_data, session_data_dir, tmp_path, train_experiment
):
    from nanogpt_core.data.templates import template_from_description
    from nanogpt_core.generate.chat import ChatSettings, Conversation
    from nanogpt_core.generate.sampling import load_model

    path = tmp_path / "ft.toml"
    path.write_text(ALPACA_RUN.format(path=shared_data / "alpaca" / "alpaca_sample.jsonl"))
    train_experiment(path, session_data_dir, tmp_path / "r", overrides=())
    text = (tmp_path / "r" / "ft" / "samples" / "epoch_0001.txt").read_text()
    # What gpt chat answers greedily with the final weights, asked the same way.
    loaded = load_model(tmp_path / "r" / "ft" / "checkpoints" / "last.pth", "cpu")
    template = template_from_description(loaded.template)
    expected = ["step 2, epoch 1, val loss " + text.split("val loss ", 1)[1].split("\n")[0], ""]
    for question in ("What is AI?", "What is 1+1?"):
        settings = ChatSettings(max_new_tokens=8, temperature=0.0)
        conversation = Conversation(loaded, template, settings, None, note=print)
        answer = conversation.ask(question, lambda _piece: None)
        expected += [f"--- {question!r}", answer, ""]
    assert text == "\n".join(expected)
    assert "### Instruction" not in text


def test_template_without_a_data_template_is_refused_at_the_start(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment(
        extra='[[callbacks]]\nplugin = "fixed_prompts"\nprompts = ["ROMEO:"]\ntemplate = true\n'
    )
    with pytest.raises(NanoGPTError) as raised:
        train_experiment(path, session_data_dir, tmp_path / "r", SHORT)
    assert str(raised.value) == (
        "fixed_prompts: template = true, but this run's data has no prompt template "
        "(it is not instruction data); set template = false"
    )
    assert not (tmp_path / "r" / "tiny" / "metrics.jsonl").exists()
