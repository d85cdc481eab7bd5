"""Prompt templates: how an instruction becomes the prompt a fine-tuned model answers.

Instruction tuning trains on *examples*: a prompt (an instruction, maybe with an
input, put into a fixed template) followed by the response and the tokenizer's
end-of-text token. The template is a plugin kind (``register_templates``), so a
third party adds another instruction format the way it adds a dataset. The
template used for training travels in ``meta.json`` and in every checkpoint as
its ``description()``, so ``gpt chat``, ``fixed_prompts`` and ``gpt export`` ask
questions exactly as the model was trained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from nanogpt_core.plugins.registry import Plugins


class Template(Protocol):
    """What a template plugin's class provides.

    - ``TemplateClass(options)`` makes one from the options class it was
      registered with; ``TemplateClass.from_description(description)`` (a
      classmethod) rebuilds one from :meth:`description`, with no other input.
    - :meth:`prompt` formats one instruction (and its optional input) into the
      text the response follows; :meth:`chat_template` is the same as a Jinja
      template for Hugging Face's ``apply_chat_template``.
    """

    def prompt(self, instruction: str, input: str = "") -> str:
        """The prompt for one instruction; the response follows it directly."""
        raise NotImplementedError

    def description(self) -> dict[str, Any]:
        """A JSON-able dict with at least ``kind`` (the registered name)."""
        raise NotImplementedError

    def chat_template(self) -> str:
        """A Jinja chat template that renders a user message as :meth:`prompt` does.

        With ``add_generation_prompt=True`` and one user message (its ``content``
        the instruction), it must give exactly ``prompt(content)``.
        """
        raise NotImplementedError

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> Template:
        """Rebuild a template from what :meth:`description` returned."""
        raise NotImplementedError


def template_from_description(
    description: dict[str, Any], plugins: Plugins | None = None
) -> Template:
    """Rebuild a template from its description, through the template registry.

    :param plugins: where to look the ``kind`` up; the installed plugins when None.
    """
    from nanogpt_core.plugins.rebuild import rebuild_from_description

    return rebuild_from_description("template", description, plugins)
