"""The ``fixed_prompts`` callback: the same prompts, sampled at every epoch end.

Watching one model answer the same questions epoch after epoch shows what it has
learnt better than a loss curve. Samples go to
``results/<name>/samples/epoch_{N:04d}.txt`` and, through ``state.add_text``, to
TensorBoard when that callback is enabled. Sampling uses its own
seeded generator and eval mode, so it never changes the training run, and stops
at the tokenizer's end-of-text token as ``gpt sample`` does.

With ``template = true`` (fine-tuning) each prompt is an instruction asked
through the run's template, exactly as ``gpt chat`` will ask it, and the files
show the answers only.
"""

from __future__ import annotations

from typing import Any

import attrs

from nanogpt_core import (
    Callback,
    NanoGPTError,
    OptionValueError,
    Template,
    Tokenizer,
    TrainerState,
    atomic_write_text,
    hookimpl,
    option,
    positive,
    template_from_description,
    tokenizer_from_description,
)

DEFAULT_PROMPTS = ["What is AI?", "1+1 is", "The capital of France is", "Once upon a time"]
# gpt sample's ranges: logits are divided by the temperature in float32, so below
# 1e-4 they can overflow to inf (NaN probabilities, a crash at the run's end);
# torch's generators take unsigned 64-bit seeds.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4
MAX_SEED = 2**64 - 1


def _temperature(_instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if value != 0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise OptionValueError(
            attribute.name,
            f"{value:g} is not a temperature: use 0 (greedy) or "
            f"{MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}",
        )


def _seed(_instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise OptionValueError(attribute.name, f"{value} is not a seed: use 0 to {MAX_SEED}")


@attrs.frozen(kw_only=True)
class FixedPromptsOptions:
    """Options of the ``fixed_prompts`` callback."""

    prompts: list[str] = option(
        doc="Prompts to complete; char-level models need prompts in their alphabet.",
        factory=lambda: list(DEFAULT_PROMPTS),
    )
    max_new_tokens: int = option(64, "Tokens generated per prompt.", validator=positive)
    temperature: float = option(
        0.8,
        "Sampling temperature; 0 picks the most likely token, else 1e-4 to 1e4.",
        validator=_temperature,
    )
    top_k: int | None = option(
        200, "Sample from the k most likely tokens only.", validator=positive
    )
    seed: int = option(
        1337,
        "Seed of the sampling generator (the same samples each time); 0 to 2**64 - 1.",
        validator=_seed,
    )
    every_epochs: int = option(
        1, "Sample every this many epochs (and at the end).", validator=positive
    )
    template: bool = option(
        False,
        "Ask the prompts as instructions through the data's template and show the answers only "
        "(fine-tuning).",
    )


class FixedPromptsCallback(Callback):
    """Completes fixed prompts at epoch ends and writes them to ``samples/``."""

    def __init__(self, options: FixedPromptsOptions) -> None:
        self.options = options
        self.tokenizer: Tokenizer | None = None
        self.template: Template | None = None
        self.encoded: list[list[int]] = []
        self.sampled_step = -1

    def on_train_start(self, state: TrainerState) -> None:
        """Encode the prompts now, so a character outside the vocabulary fails at once.

        With ``template = true`` a run whose data has no template is refused here too.
        """
        self.tokenizer = tokenizer_from_description(state.tokenizer)
        self.template = self._template(state)
        self.encoded = []
        for i, prompt in enumerate(self.options.prompts):
            text = prompt if self.template is None else self.template.prompt(prompt)
            try:
                ids = self.tokenizer.encode(text)
            except NanoGPTError as exc:
                raise NanoGPTError(f"fixed_prompts: prompts[{i}] = {prompt!r}: {exc}") from None
            self.encoded.append(ids or self.tokenizer.start_ids())

    def _template(self, state: TrainerState) -> Template | None:
        """The run's template when ``template = true``, else None."""
        if not self.options.template:
            return None
        if state.template is None:
            raise NanoGPTError(
                "fixed_prompts: template = true, but this run's data has no prompt template "
                "(it is not instruction data); set template = false"
            )
        return template_from_description(dict(state.template))

    def on_epoch_end(self, state: TrainerState) -> None:
        """Sample every ``every_epochs`` epochs."""
        if state.epoch % self.options.every_epochs == 0:
            self.sample(state)

    def on_train_end(self, state: TrainerState) -> None:
        """Sample once more at the end unless this step was just sampled."""
        if state.status == "completed" and state.step != self.sampled_step:
            self.sample(state)

    def sample(self, state: TrainerState) -> None:
        """Generate a completion of every prompt and write ``samples/epoch_{N:04d}.txt``."""
        import torch

        self.sampled_step = state.step
        # A model sharded with FSDP gathers its weights with every process at each
        # forward: then every process generates (the same tokens), the main one writes.
        from torch.distributed.fsdp import FSDPModule

        sharded = isinstance(state.model, FSDPModule)
        if not state.is_main_process and not sharded:
            return
        model = state.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.options.seed)
        opts = self.options
        lines = [
            f"step {state.step}, epoch {state.epoch}, val loss {state.metrics.get('val_loss', float('nan')):.4f}",
            "",
        ]
        try:
            for prompt, ids in zip(opts.prompts, self.encoded, strict=True):
                with state.accelerator.autocast():
                    completion = self.complete(model, ids, generator)
                # With a template the prompt is the whole instruction prompt: show the answer.
                shown = completion if self.template is not None else prompt + completion
                lines += [f"--- {prompt!r}", shown, ""]
                if state.is_main_process:
                    state.add_text(f"samples/{prompt}", shown)
        finally:
            model.train(was_training)
        if not state.is_main_process:
            return
        path = state.paths.samples / f"epoch_{state.epoch:04d}.txt"
        atomic_write_text(path, "\n".join(lines))

    def complete(self, model: Any, ids: list[int], generator: Any) -> str:
        """The model's continuation of ``ids``, ending before end-of-text."""
        import torch

        opts = self.options
        context = torch.tensor([ids], dtype=torch.long, device=generator.device)
        new: list[int] = []
        for token in model.generate_tokens(
            context,
            opts.max_new_tokens,
            temperature=opts.temperature,
            top_k=opts.top_k,
            generator=generator,
            vocab_limit=self.tokenizer.vocab_size,
        ):
            token_id = int(token[0, 0])
            if token_id == self.tokenizer.eot_id:
                break
            new.append(token_id)
        return self.tokenizer.decode(new)


@hookimpl
def register_callbacks(register):
    """Register the ``fixed_prompts`` callback."""
    register(
        "fixed_prompts",
        FixedPromptsCallback,
        options=FixedPromptsOptions,
        description="Complete fixed prompts at each epoch end into results/<name>/samples/.",
    )
