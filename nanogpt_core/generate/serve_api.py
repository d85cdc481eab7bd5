"""The OpenAI request bodies ``gpt serve`` accepts, and how chat messages become a prompt.

Bodies are checked strictly (``"12"`` is not a number, ``1.5`` not an integer,
NaN and infinities are not numbers) and every number against a range that
sampling takes, before the request is admitted (``max_tokens`` against the
server's limit in :mod:`nanogpt_core.generate.serve`). Fields OpenAI has but we
do not use are accepted and ignored, as other OpenAI-compatible servers do,
except the few whose answer we cannot honour (``logprobs``, ``echo``, tools),
which are refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from nanogpt_core.data.templates import Template
from nanogpt_core.errors import NanoGPTError, PluginFault
from nanogpt_core.generate.chat import ChatSettings, Conversation
from nanogpt_core.generate.sampling import LoadedModel, encode_prompt
from nanogpt_core.generate.sampling_settings import sampling_problem

# OpenAI allows at most four stop strings.
MAX_STOPS = 4
MAX_CHOICES = 16
# top_k past the vocabulary is the whole vocabulary; the bound keeps the number a
# machine integer wherever the sampler puts it (a tensor of int64).
MAX_TOP_K = 2**31 - 1


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool = False


class SamplingBody(BaseModel):
    """The parameters completions and chat completions share."""

    # NaN and infinities (JSON's NaN, Infinity, 1e999) are refused as not finite.
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None

    @model_validator(mode="after")
    def _supported(self) -> SamplingBody:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOPS:
            raise ValueError(f"stop: at most {MAX_STOPS} stop strings")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs: not supported by this server")
        return self

    @field_validator("temperature", "top_p", "seed")
    @classmethod
    def _in_range(cls, value: Any, info: ValidationInfo) -> Any:
        # The ranges gpt sample's and gpt chat's options have (a temperature of
        # 1e-300 passes `ge=0` but overflows the logits).
        problem = None if value is None else sampling_problem(str(info.field_name), value)
        if problem:
            raise ValueError(problem)
        return value

    def stops(self) -> tuple[str, ...]:
        """``stop`` as a tuple (a single string is one stop string)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionBody(SamplingBody):
    """``POST /v1/completions``: text to continue (empty: start of text)."""

    prompt: str = ""
    echo: bool | None = None

    @model_validator(mode="after")
    def _no_echo(self) -> CompletionBody:
        if self.echo:
            raise ValueError("echo: not supported by this server")
        return self


class TextPart(BaseModel):
    """One part of a message whose content is a list (only text parts)."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatBody(SamplingBody):
    """``POST /v1/chat/completions``: a conversation whose last message is the user's."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: Any = None

    @model_validator(mode="after")
    def _last_is_user(self) -> ChatBody:
        if self.tools:
            raise ValueError("tools: not supported by this server")
        if self.messages[-1].role != "user":
            raise ValueError("messages: the last message must be the user's")
        return self


# A checkpoint without a template sees the conversation as a plain transcript.
PLAIN_USER = "User: "
PLAIN_ASSISTANT = "Assistant:"
PLAIN_STOP = "\nUser:"


def turns(messages: list[Message]) -> tuple[list[tuple[str, str]], str]:
    """``(question, answer)`` pairs of earlier turns, and the new question.

    System (and developer) messages go in front of the next user message, with
    a blank line between: templates have no place of their own for them.
    Consecutive user messages are joined the same way.
    """
    pairs: list[tuple[str, str]] = []
    pending: list[str] = []
    for message in messages:
        if message.role == "assistant":
            pairs.append(("\n\n".join(pending), message.text()))
            pending = []
        else:
            pending.append(message.text())
    return pairs, "\n\n".join(pending)


def template_context(
    loaded: LoadedModel, template: Template, messages: list[Message]
) -> tuple[list[int], int]:
    """Prompt ids as ``gpt chat`` builds them for this conversation, and how many were dropped.

    Earlier turns are prompt + answer + end-of-text, as in training; the
    oldest tokens go when the whole is longer than ``block_size``.
    """
    conversation = Conversation(loaded, template, ChatSettings(), None, note=lambda _text: None)
    pairs, question = turns(messages)
    tokenizer = loaded.tokenizer
    eot = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    for asked, answered in pairs:
        _, prompt = conversation.context(asked)
        conversation.history += prompt + _encode(loaded, answered) + eot
    ids, prompt = conversation.context(question)
    return ids, len(conversation.history) + len(prompt) - len(ids)


def plain_context(loaded: LoadedModel, messages: list[Message]) -> tuple[list[int], int]:
    """Prompt ids of a "User: ... / Assistant: ..." transcript, and how many were dropped."""
    pairs, question = turns(messages)
    text = "".join(f"{PLAIN_USER}{q}\n{PLAIN_ASSISTANT} {a}\n" for q, a in pairs)
    return encode_prompt(loaded, f"{text}{PLAIN_USER}{question}\n{PLAIN_ASSISTANT}")


def _encode(loaded: LoadedModel, text: str) -> list[int]:
    try:
        return loaded.tokenizer.encode(text)
    except PluginFault:
        raise  # the server's fault (a 500), not the request's
    except NanoGPTError as exc:
        raise NanoGPTError(f"messages: {exc}") from None
