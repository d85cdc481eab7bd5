"""The ``alpaca`` template: Stanford Alpaca's two prompts, character for character.

An instruction with an input gets the long prompt (with an ``### Input:``
section), one without gets the short prompt; either ends with
``### Response:\\n`` and the response follows directly. These are the strings of
``PROMPT_DICT`` in tatsu-lab/stanford_alpaca's ``train.py``.

:meth:`AlpacaTemplate.chat_template` is the same format as a Jinja template for
Hugging Face's ``apply_chat_template``:

- a ``user`` message renders as the prompt up to (not including)
  ``### Response:\\n``; its ``content`` is the instruction, and an optional
  ``input`` key of the message fills the ``### Input:`` section;
- an ``assistant`` message renders as ``### Response:\\n`` + its content +
  ``eos_token``, so each earlier user/assistant pair is exactly the training
  example ``prompt + response + <|endoftext|>``;
- ``add_generation_prompt=True`` appends ``### Response:\\n``, so one user
  message gives exactly ``prompt(instruction)``;
- ``system`` messages are not part of the format and render as nothing.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from nanogpt_core import NanoGPTError, hookimpl

NAME = "alpaca"
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
)
WITHOUT_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
INSTRUCTION = "### Instruction:\n{instruction}\n\n"
INPUT = "### Input:\n{input}\n\n"
RESPONSE = "### Response:\n"


@attrs.frozen(kw_only=True)
class AlpacaTemplateOptions:
    """The ``alpaca`` template takes no options."""


class AlpacaTemplate:
    """Stanford Alpaca's prompt format."""

    def __init__(self, options: AlpacaTemplateOptions | None = None) -> None:
        self.options = options or AlpacaTemplateOptions()

    def prompt(self, instruction: str, input: str = "") -> str:
        """The long prompt when ``input`` is non-empty, else the short one."""
        if input:
            body = INSTRUCTION.format(instruction=instruction) + INPUT.format(input=input)
            return WITH_INPUT + body + RESPONSE
        return WITHOUT_INPUT + INSTRUCTION.format(instruction=instruction) + RESPONSE

    def description(self) -> dict[str, Any]:
        """``{"kind": "alpaca"}``: the format has nothing else to record."""
        return {"kind": NAME}

    def chat_template(self) -> str:
        """A Jinja chat template rendering conversations as :meth:`prompt` does (module docstring)."""

        def text(value: str) -> str:
            # A JSON string is a valid Jinja string literal with the same escapes.
            return "{{ " + json.dumps(value) + " }}"

        def instruction(header: str) -> str:
            return text(header + "### Instruction:\n") + "{{ message['content'] }}" + text("\n\n")

        return (
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            "{%- if message.get('input') -%}"
            + instruction(WITH_INPUT)
            + text("### Input:\n")
            + "{{ message['input'] }}"
            + text("\n\n")
            + "{%- else -%}"
            + instruction(WITHOUT_INPUT)
            + "{%- endif -%}"
            "{%- elif message['role'] == 'assistant' -%}"
            + text(RESPONSE)
            + "{{ message['content'] }}{{ eos_token }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}" + text(RESPONSE) + "{%- endif -%}"
        )

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> AlpacaTemplate:
        """The ``alpaca`` template (its description holds nothing else)."""
        if description.get("kind") != NAME:
            raise NanoGPTError(
                f"alpaca template description: kind must be {NAME!r}, "
                f"got {description.get('kind')!r}"
            )
        return cls()


@hookimpl
def register_templates(register):
    """Register the ``alpaca`` template."""
    register(
        NAME,
        AlpacaTemplate,
        options=AlpacaTemplateOptions,
        description="Stanford Alpaca's prompts (with and without an input).",
    )
