"""The shapes of OpenAI's response objects: completions, chat completions, usage."""

from __future__ import annotations

from typing import Any


class CompletionShape:
    """OpenAI's ``text_completion`` objects."""

    prefix, whole, chunk = "cmpl", "text_completion", "text_completion"

    def __init__(self, model: str) -> None:
        self.model = model

    def start(self, index: int) -> dict[str, Any] | None:
        """The choice that opens choice ``index`` in a stream (none for completions)."""
        return None

    def piece(self, index: int, text: str, reason: str | None = None) -> dict[str, Any]:
        """One choice of a chunk."""
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    def final(self, index: int, text: str, reason: str) -> dict[str, Any]:
        """One choice of a whole response."""
        return self.piece(index, text, reason)


class ChatShape(CompletionShape):
    """OpenAI's ``chat.completion`` objects."""

    prefix, whole, chunk = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def start(self, index: int) -> dict[str, Any] | None:
        """The chunk choice that opens an assistant message."""
        delta = {"role": "assistant", "content": ""}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def piece(self, index: int, text: str, reason: str | None = None) -> dict[str, Any]:
        """One choice of a chunk: a delta of the message."""
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}

    def final(self, index: int, text: str, reason: str) -> dict[str, Any]:
        """One choice of a whole response: the assistant's message."""
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object: tokens in, tokens out and both."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
