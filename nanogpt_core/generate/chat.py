"""``gpt chat``: a conversation with a fine-tuned checkpoint.

Each question goes through the template the model was fine-tuned with (its
description travels in the checkpoint), and the answer streams token by token
through the KV cache until the end-of-text token. Earlier turns stay in the
context as the model saw examples in training: prompt + answer + end-of-text,
one after another. When the conversation outgrows ``block_size`` its oldest
tokens are dropped (a note says so once).

Three ways in: a terminal (line editing and history through ``prompt_toolkit``),
lines on stdin (one question a line, for scripts), and ``--once``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import click

from nanogpt_core.data.templates import Template
from nanogpt_core.errors import NanoGPTError, PluginFault
from nanogpt_core.generate.sampling import (
    LoadedModel,
    contained_from_description,
    load_model,
    stream_pieces,
)
from nanogpt_core.generate.sampling_settings import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    temperature_problem,
)

if TYPE_CHECKING:
    from nanogpt_core.plugins.registry import Plugins

PROMPT = "> "
COMMANDS = "/reset forgets the conversation, /temperature X changes it, /quit (or Ctrl-D) ends"


@attrs.define(kw_only=True)
class ChatSettings:
    """How answers are sampled; ``/temperature`` changes ``temperature`` mid-conversation."""

    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None


def load_chat_model(
    ckpt: Path, device: str, plugins: Plugins | None = None
) -> tuple[LoadedModel, Template]:
    """The checkpoint's model and its template; refuse a checkpoint that has none."""
    loaded = load_model(ckpt, device, plugins)
    if loaded.template is None:
        raise NanoGPTError(
            f"{ckpt}: this checkpoint has no prompt template (it was not fine-tuned on "
            f"instructions), so there is nothing to chat with; continue text with "
            f"`gpt sample --ckpt {ckpt}` instead"
        )
    return loaded, contained_from_description("template", loaded.template, plugins)


class Conversation:
    """The turns so far, as token ids, and the next answer to stream.

    Answers are kept as the ids the model generated, not re-encoded from their
    text, so the context is exactly what the model produced.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        template: Template,
        settings: ChatSettings,
        generator: Any,
        note: Callable[[str], None],
    ) -> None:
        self.loaded = loaded
        self.template = template
        self.settings = settings
        self.generator = generator
        self.note = note
        self.history: list[int] = []
        self.noted_truncation = False

    @property
    def block_size(self) -> int:
        """The model's context length in tokens."""
        return int(self.loaded.model.config.block_size)

    def reset(self) -> None:
        """Forget every earlier turn."""
        self.history = []

    def context(self, instruction: str, input: str = "") -> tuple[list[int], list[int]]:
        """The ids the model sees for this question (history + prompt, cut to fit) and the prompt's."""
        text = self.template.prompt(instruction, input)
        try:
            prompt = self.loaded.tokenizer.encode(text)
        except PluginFault:
            raise
        except NanoGPTError as exc:
            raise NanoGPTError(f"question: {exc}") from None
        ids = self.history + prompt
        if len(ids) > self.block_size:
            if not self.noted_truncation:
                self.note(
                    f"note: the conversation is longer than the model's block_size "
                    f"({self.block_size} tokens); its oldest tokens are dropped"
                )
                self.noted_truncation = True
            ids = ids[-self.block_size :]
        return ids, prompt

    def ask(self, instruction: str, write: Callable[[str], None], input: str = "") -> str:
        """Stream the answer to ``instruction`` through ``write``; return it.

        An answer stopped by Ctrl-C stays in the conversation as far as it got
        (the user saw it), closed by end-of-text like a finished one.
        """
        ids, prompt = self.context(instruction, input)
        answer: list[int] = []
        pieces: list[str] = []
        try:
            for new, text in self._pieces(ids):
                answer += new
                pieces.append(text)
                write(text)
        finally:
            eot = self.loaded.tokenizer.eot_id
            turn = prompt + answer + ([] if eot is None else [eot])
            # Only the last block_size tokens can ever be seen again.
            self.history = (self.history + turn)[-self.block_size :]
        return "".join(pieces)

    def _pieces(self, ids: list[int]) -> Iterator[tuple[list[int], str]]:
        s = self.settings
        return stream_pieces(
            self.loaded,
            ids,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            generator=self.generator,
        )


def run_command(line: str, conversation: Conversation) -> bool:
    """Carry out a ``/command`` line; return False for ``/quit``.

    A bad command or value is one line on stderr and the conversation goes on.
    """
    name, _, argument = line.strip().partition(" ")
    argument = argument.strip()
    if name == "/quit":
        return False
    if name == "/reset":
        conversation.reset()
        click.echo("(conversation reset)", err=True)
    elif name == "/temperature":
        conversation.settings.temperature = parse_temperature(argument)
        click.echo(f"(temperature {conversation.settings.temperature:g})", err=True)
    else:
        raise NanoGPTError(f"unknown command {name!r}; commands: {COMMANDS}")
    return True


def parse_temperature(text: str) -> float:
    """A temperature from ``/temperature X``, in the range ``--temperature`` has."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if temperature_problem(value):
        raise NanoGPTError(
            f"/temperature: expected 0 (greedy) or {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}, "
            f"got {text!r}; e.g. /temperature 0.7"
        )
    return value


def write_stdout(text: str) -> None:
    """Write a piece of an answer and show it at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def answer_once(conversation: Conversation, question: str, input: str = "") -> None:
    """``--once``: print one answer and a newline."""
    conversation.ask(question, write_stdout, input)
    write_stdout("\n")


def chat_loop(
    conversation: Conversation, read: Callable[[], str | None], *, independent: bool = False
) -> None:
    """Answer each line ``read`` returns until it returns None or ``/quit``.

    ``read`` raises KeyboardInterrupt for Ctrl-C at the prompt, which ends the
    conversation; Ctrl-C during an answer stops that answer only. A bad line is
    one error line and the conversation goes on; a plugin's fault ends it.

    :param independent: answer every line on its own, without the earlier turns
        (a script's questions, one per line, are separate questions).
    """
    while True:
        try:
            line = read()
        except KeyboardInterrupt:
            return
        if line is None:
            return
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not run_command(line, conversation):
                    return
                continue
            if independent:
                conversation.reset()
            conversation.ask(line, write_stdout)
            write_stdout("\n\n")
        except KeyboardInterrupt:
            write_stdout("\n")
            click.echo("(answer stopped)", err=True)
        except PluginFault:
            raise  # the template or tokenizer is broken: every later question would fail too
        except NanoGPTError as error:
            click.echo(f"Error: {error}", err=True)


def terminal_reader() -> Callable[[], str | None]:
    """Read lines with editing and history (prompt_toolkit); None at Ctrl-D."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    session: PromptSession[str] = PromptSession(history=InMemoryHistory())

    def read() -> str | None:
        try:
            return session.prompt(PROMPT)
        except EOFError:
            return None

    return read


def stream_reader(stream: Any, prompt: str = "") -> Callable[[], str | None]:
    """Read lines from a stream (a pipe, a file); None at its end.

    ``prompt`` goes to stderr before each line, for a terminal whose stdout is
    redirected.
    """

    def read() -> str | None:
        if prompt:
            click.echo(prompt, nl=False, err=True)
        line = stream.readline()
        return line if line else None

    return read


def start_chat(
    ckpt: Path,
    *,
    settings: ChatSettings,
    seed: int,
    device: str = "auto",
    question: str | None = None,
    input: str = "",
    plugins: Plugins | None = None,
) -> None:
    """What ``gpt chat`` does: one answer with ``question``, else a conversation."""
    import torch

    loaded, template = load_chat_model(ckpt, device, plugins)
    generator = torch.Generator(device=loaded.device).manual_seed(seed)
    conversation = Conversation(
        loaded, template, settings, generator, note=lambda text: click.echo(text, err=True)
    )
    if question is not None:
        answer_once(conversation, question, input)
        return
    if not sys.stdin.isatty():
        chat_loop(conversation, stream_reader(sys.stdin), independent=True)
        return
    click.echo(
        f"chatting with {ckpt} (step {loaded.step}, template {loaded.template.get('kind')!r}); "
        f"{COMMANDS}",
        err=True,
    )
    read = terminal_reader() if sys.stdout.isatty() else stream_reader(sys.stdin, PROMPT)
    chat_loop(conversation, read)
