"""`gpt chat`: answers through the checkpoint's template, scripts, commands, a real terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch

from nanogpt_core.generate.chat import ChatSettings, Conversation
from nanogpt_core.generate.sampling import load_model
from nanogpt_core.model.gpt import GPT, GPTConfig
from nanogpt_core.train.checkpoints import save_checkpoint
from nanogpt_plugins.templates.alpaca import AlpacaTemplate

GPT2 = {"kind": "gpt2", "name": "gpt2", "vocab_size": 50257, "eot_id": 50256}
EOT = 50256
ALPACA = AlpacaTemplate()
# (instruction, input, response): what the tiny model is fine-tuned on.
EXAMPLES = [
    ("What is AI?", "", "AI is the study of machines that think."),
    ("What is 1+1?", "", "1+1 is 2."),
    ("Add the numbers.", "2 and 3", "2 + 3 = 5."),
]
MAX_NEW = 40


def save(path: Path, model: GPT, template: dict | None) -> Path:
    """A checkpoint as a fine-tuning run writes it (``template`` None: pre-trained)."""
    checkpoint = {
        "model": model.state_dict(),
        "model_args": attrs.asdict(model.config),
        "step": 30,
        "tokenizer": GPT2,
        "template": template,
    }
    save_checkpoint(path, checkpoint)
    return path


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(
        GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32, bias=True)
    )


def fine_tune(model: GPT, steps: int = 30) -> GPT:
    """A few steps on EXAMPLES, loss on response + end-of-text only: enough to stop at EOT."""
    from nanogpt_core.data.tokenizers import tokenizer_from_description

    tokenizer = tokenizer_from_description(GPT2)
    rows = []
    for instruction, input_text, response in EXAMPLES:
        prompt = tokenizer.encode(ALPACA.prompt(instruction, input_text))
        answer = [*tokenizer.encode(response), EOT]
        rows.append((prompt + answer, [-1] * (len(prompt) - 1) + answer + [-1]))
    width = max(len(x) for x, _ in rows)
    x = torch.tensor([ids + [EOT] * (width - len(ids)) for ids, _ in rows])
    y = torch.tensor([t + [-1] * (width - len(t)) for _, t in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    for _ in range(steps):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def tuned_ckpt(tmp_path_factory) -> Path:
    """A tiny model briefly fine-tuned through the alpaca template (its answers end at EOT)."""
    return save(
        tmp_path_factory.mktemp("tuned") / "last.pth", fine_tune(tiny_model()), ALPACA.description()
    )


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> Path:
    """An untrained model with the alpaca template: at temperature 1 it rambles on and on."""
    return save(
        tmp_path_factory.mktemp("random") / "last.pth", tiny_model().eval(), {"kind": "alpaca"}
    )


def greedy_answer(ckpt: Path, question: str, input_text: str = "") -> str:
    """What a fresh conversation answers greedily, computed in this process."""
    conversation = Conversation(
        load_model(ckpt, "cpu"),
        ALPACA,
        ChatSettings(max_new_tokens=MAX_NEW, temperature=0.0),
        None,
        note=lambda _text: None,
    )
    return conversation.ask(question, lambda _piece: None, input_text)


def gpt(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_once_greedy_equals_sample_on_the_rendered_prompt(tuned_ckpt):
    question = "What is AI?"
    prompt = ALPACA.prompt(question)
    common = ["--ckpt", str(tuned_ckpt), "--temperature", "0", "--max-new-tokens", str(MAX_NEW)]
    chat = gpt("chat", "--once", question, *common)
    sample = gpt("sample", "--prompt", prompt, *common)
    assert chat.returncode == 0, chat.stderr
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout == prompt + chat.stdout
    answer = chat.stdout.removesuffix("\n")
    # It stopped at end-of-text, well before the token limit, and shows no "<|endoftext|>".
    assert answer and "<|endoftext|>" not in answer
    assert len(load_model(tuned_ckpt, "cpu").tokenizer.encode(answer)) < MAX_NEW
    assert answer == greedy_answer(tuned_ckpt, question)


@pytest.mark.slow
def test_once_with_an_input_asks_the_long_prompt(tuned_ckpt):
    chat = gpt(
        "chat", "--ckpt", str(tuned_ckpt), "--once", "Add the numbers.", "--input", "2 and 3",
        "--temperature", "0", "--max-new-tokens", str(MAX_NEW),
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == greedy_answer(tuned_ckpt, "Add the numbers.", "2 and 3") + "\n"


@pytest.mark.slow
def test_stdin_lines_are_questions_and_commands_go_on(tuned_ckpt):
    first = greedy_answer(tuned_ckpt, "What is AI?")
    lines = [
        "What is AI?",
        "",
        "/temperature warm",
        "/reset",
        "What is AI?",
        "/quit",
        "What is 1+1?",
    ]
    done = gpt(
        "chat", "--ckpt", str(tuned_ckpt), "--temperature", "0", "--max-new-tokens", str(MAX_NEW),
        stdin="\n".join(lines) + "\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The same answer twice (/reset forgot the first turn), nothing after /quit.
    assert done.stdout == f"{first}\n\n{first}\n\n"
    assert done.stderr.splitlines() == [
        "Error: /temperature: expected 0 (greedy) or 0.0001 to 10000, got 'warm'; "
        "e.g. /temperature 0.7",
        "(conversation reset)",
    ]


@pytest.mark.slow
def test_a_checkpoint_without_a_template_is_one_line_and_exit_2(tmp_path):
    ckpt = save(tmp_path / "pretrained.pth", tiny_model(), None)
    done = gpt("chat", "--ckpt", str(ckpt), "--once", "Hi")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"Error: {ckpt}: this checkpoint has no prompt template (it was not fine-tuned on "
        f"instructions), so there is nothing to chat with; continue text with "
        f"`gpt sample --ckpt {ckpt}` instead"
    ]
    assert done.stdout == ""


def test_the_conversation_keeps_earlier_turns_and_drops_the_oldest_tokens(random_ckpt):
    loaded = load_model(random_ckpt, "cpu")
    notes: list[str] = []
    conversation = Conversation(
        loaded, ALPACA, ChatSettings(max_new_tokens=5, temperature=0.0), None, notes.append
    )
    tokenizer = loaded.tokenizer
    answer = conversation.ask("Hi", lambda _piece: None)
    turn = ALPACA.prompt("Hi") + answer + "<|endoftext|>"
    assert tokenizer.decode(conversation.history) == turn
    assert notes == []
    # The next question comes after the whole first turn, cut to the last block_size tokens.
    ids, prompt = conversation.context("Why?")
    assert prompt == tokenizer.encode(ALPACA.prompt("Why?"))
    assert ids == (conversation.history + prompt)[-64:] and len(ids) == 64
    conversation.ask("Why?", lambda _piece: None)
    conversation.ask("Why not?", lambda _piece: None)
    assert notes == [
        "note: the conversation is longer than the model's block_size (64 tokens); "
        "its oldest tokens are dropped"
    ]
    conversation.reset()
    assert conversation.context("Hi")[0] == tokenizer.encode(ALPACA.prompt("Hi"))


@pytest.mark.parametrize("text", ["warm", "-1", "nan", "inf", "", "1e-300", "1e9"])
def test_bad_temperatures_are_refused(text):
    from nanogpt_core.errors import NanoGPTError
    from nanogpt_core.generate.chat import parse_temperature

    with pytest.raises(
        NanoGPTError, match=r"^/temperature: expected 0 \(greedy\) or 0.0001 to 10000, got "
    ):
        parse_temperature(text)
    assert parse_temperature("0") == 0.0 and parse_temperature(" 1.5") == 1.5


# The prompt "> " as prompt_toolkit draws it: at a line start after escape codes, and
# its trailing space drawn as cursor movement.
PROMPT = re.compile(r"\n(?:\x1b\[[0-9;?]*[A-Za-z])*>")


def spawn_chat(ckpt: Path, *args: str):
    """``gpt chat`` in a pseudo-terminal, as a user meets it."""
    pexpect = pytest.importorskip("pexpect")
    # No terminal answers prompt_toolkit's cursor-position queries here.
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm"}
    return pexpect.spawn(
        sys.executable,
        ["-m", "nanogpt_core", "chat", "--ckpt", str(ckpt), *args],
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        timeout=30,
        dimensions=(40, 200),
    )


@pytest.mark.slow
def test_a_terminal_conversation_streams_resets_and_ends_with_ctrl_d(tuned_ckpt):
    import pexpect

    answer = greedy_answer(tuned_ckpt, "What is AI?")
    child = spawn_chat(tuned_ckpt, "--temperature", "0", "--max-new-tokens", str(MAX_NEW))
    try:
        child.expect_exact("chatting with")
        child.expect(PROMPT)
        child.sendline("What is AI?")
        child.expect_exact(answer.replace("\n", "\r\n"))
        child.expect(PROMPT)
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")
        child.expect(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


@pytest.mark.slow
def test_ctrl_c_stops_an_answer_only_and_at_the_prompt_ends_the_chat(random_ckpt):
    import pexpect

    child = spawn_chat(random_ckpt, "--temperature", "1", "--max-new-tokens", "1000000")
    try:
        child.expect(PROMPT)
        child.sendline("Tell me everything.")
        child.expect_exact("Tell me everything.")
        # The answer streams: plenty of it arrives long before a million tokens are done.
        child.expect(re.compile(r"[\s\S]{300}"))
        child.sendintr()
        child.expect_exact("(answer stopped)")
        child.expect(PROMPT)
        child.sendline("/temperature 0")
        child.expect_exact("(temperature 0)")
        child.expect(PROMPT)
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "Traceback" not in (child.before or "")
