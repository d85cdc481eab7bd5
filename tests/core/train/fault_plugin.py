"""A third-party plugin of every kind whose methods raise on demand (fault-injection tests).

Installed as a distribution of its own by ``test_plugin_faults.py`` (module
``faulty``, entry point ``faulty``). ``NANOGPT_FAULT=<kind>.<method>`` makes that
method raise ``RuntimeError("injected fault in <kind>.<method>")``;
``NANOGPT_FAULT=callback.unplain_state`` makes the callback's ``state_dict``
return a numpy number, which ``torch.load(weights_only=True)`` would refuse.
The ``faulty_loss`` callback corrupts chosen steps' losses (``NANOGPT_LOSS_FAULT``).
It imports nothing but ``nanogpt_core``'s public API, as a real plugin must.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs

from nanogpt_core import Callback, EvalResult, Tokenizer, hookimpl, option


def fault(kind: str, method: str) -> None:
    """Raise when ``NANOGPT_FAULT`` names this method."""
    if os.environ.get("NANOGPT_FAULT") == f"{kind}.{method}":
        raise RuntimeError(f"injected fault in {kind}.{method}")


@attrs.frozen(kw_only=True)
class TextOptions:
    """Options of the ``faulty_text`` dataset."""

    path: str = option("", "A text file; its first 20,000 characters are the corpus.")


class TextSource:
    """Lines of a text file: nine tenths train, the rest val."""

    variant = "lines"
    tokenizer = "faulty_tok"
    description = "lines of a text file"

    def __init__(self, options: TextOptions) -> None:
        fault("dataset", "factory")
        self.text = Path(options.path).read_text()[:20_000]

    def documents(self, split: str, downloads: Path) -> Any:
        fault("dataset", "documents")
        lines = self.text.splitlines(keepends=True)
        cut = len(lines) * 9 // 10
        yield "".join(lines[:cut] if split == "train" else lines[cut:])


@attrs.frozen(kw_only=True)
class NoOptions:
    """No options."""


class ExampleSource:
    """Sums to answer, as instruction examples asked through the ``faulty_tpl`` template."""

    variant = "sums"
    tokenizer = "faulty_tok"
    template = "faulty_tpl"
    description = "sums"

    def __init__(self, options: NoOptions) -> None:
        pass

    def examples(self, split: str, downloads: Path) -> Any:
        fault("dataset", "examples")
        numbers = range(0, 120) if split == "train" else range(120, 140)
        for n in numbers:
            yield {"instruction": f"{n} plus {n % 7}", "input": "", "output": str(n + n % 7)}


class FaultyTokenizer(Tokenizer):
    """One token per character; id 0 ends a text."""

    eot_id = 0

    def __init__(self, options: Any = None, *, chars: str = "") -> None:
        fault("tokenizer", "factory")
        self.chars = chars
        self.vocab_size = len(chars) + 1

    def learn(self, documents: Any) -> None:
        fault("tokenizer", "learn")
        self.chars = "".join(sorted(set("".join(documents))))
        self.vocab_size = len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        fault("tokenizer", "encode")
        return [self.chars.index(c) + 1 for c in text]

    def decode(self, ids: Any) -> str:
        fault("tokenizer", "decode")
        return "".join(self.chars[i - 1] for i in ids if 0 < i <= len(self.chars))

    def description(self) -> dict[str, Any]:
        fault("tokenizer", "description")
        return {"kind": "faulty_tok", "vocab_size": self.vocab_size, "chars": self.chars}

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> FaultyTokenizer:
        fault("tokenizer", "from_description")
        return cls(chars=description["chars"])


class FaultyTemplate:
    """``Q: <instruction>`` then ``A: ``."""

    def __init__(self, options: Any = None) -> None:
        fault("template", "factory")

    def prompt(self, instruction: str, input: str = "") -> str:
        fault("template", "prompt")
        return f"Q: {instruction}\nA: "

    def description(self) -> dict[str, Any]:
        fault("template", "description")
        return {"kind": "faulty_tpl"}

    def chat_template(self) -> str:
        fault("template", "chat_template")
        return "{% for m in messages %}Q: {{ m['content'] }}\nA: {% endfor %}"

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> FaultyTemplate:
        fault("template", "from_description")
        return cls()


class FaultyCallback(Callback):
    """Counts steps; every hook may raise."""

    def __init__(self, options: Any) -> None:
        fault("callback", "factory")
        self.steps = 0

    def on_train_start(self, state: Any) -> None:
        fault("callback", "on_train_start")

    def on_step_end(self, state: Any) -> None:
        self.steps += 1
        fault("callback", "on_step_end")

    def on_metrics(self, state: Any, record: Any) -> None:
        fault("callback", "on_metrics")

    def on_eval_end(self, state: Any) -> None:
        fault("callback", "on_eval_end")

    def on_epoch_end(self, state: Any) -> None:
        fault("callback", "on_epoch_end")

    def on_checkpoint(self, state: Any, path: Any) -> None:
        fault("callback", "on_checkpoint")

    def on_train_end(self, state: Any) -> None:
        fault("callback", "on_train_end")

    def state_dict(self) -> dict[str, Any]:
        fault("callback", "state_dict")
        if os.environ.get("NANOGPT_FAULT") == "callback.unplain_state":
            import numpy as np

            return {"steps": np.float64(self.steps)}
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fault("callback", "load_state_dict")
        self.steps = state["steps"]


class LossFault(Callback):
    """Corrupts the training loss at chosen steps, so that the step guards have work.

    ``NANOGPT_LOSS_FAULT="5:nan,9:huge"`` makes step 5's loss NaN and step 9's
    a thousand times larger (its gradients too); unset, nothing. A forward
    hook on the model, in training mode only (evaluation is left alone).
    ``NANOGPT_LOSS_FAULT_RANK=1`` corrupts process 1's losses only.
    """

    def __init__(self, options: Any) -> None:
        factors = {"nan": float("nan"), "huge": 1000.0}
        items = filter(None, os.environ.get("NANOGPT_LOSS_FAULT", "").split(","))
        self.factors = {int(step): factors[kind] for step, kind in (i.split(":") for i in items)}
        self.next_step = 1

    def on_train_start(self, state: Any) -> None:
        self.next_step = state.step + 1
        rank = os.environ.get("NANOGPT_LOSS_FAULT_RANK")
        if rank is None or int(rank) == state.accelerator.process_index:
            state.model.register_forward_hook(self._corrupt)

    def on_step_end(self, state: Any) -> None:
        self.next_step = state.step + 1

    def _corrupt(self, module: Any, inputs: Any, output: Any) -> Any:
        logits, loss = output
        factor = self.factors.get(self.next_step)
        if factor is not None and module.training and loss is not None:
            return logits, loss * factor
        return None


class FaultyTask:
    """An eval task that scores nothing."""

    def __init__(self, options: Any) -> None:
        fault("eval_task", "factory")

    def evaluate(self, evaluator: Any) -> EvalResult:
        fault("eval_task", "evaluate")
        return EvalResult(metrics={"one": 1.0}, n=1)


class FaultyOptimizer:
    """Plain SGD whose every method may raise."""

    def __init__(self, options: Any) -> None:
        fault("optimizer", "factory")

    def build(self, model: Any, train: Any, device_type: str) -> Any:
        import torch

        fault("optimizer", "build")

        class SGD(torch.optim.SGD):
            def step(self, closure: Any = None) -> Any:
                fault("optimizer", "step")
                return super().step(closure)

            def zero_grad(self, set_to_none: bool = True) -> None:
                fault("optimizer", "zero_grad")
                super().zero_grad(set_to_none)

            def state_dict(self) -> dict[str, Any]:
                fault("optimizer", "state_dict")
                return super().state_dict()

            def load_state_dict(self, state_dict: dict[str, Any]) -> None:
                fault("optimizer", "load_state_dict")
                super().load_state_dict(state_dict)

        return SGD(model.parameters(), lr=train.learning_rate)


class FaultySchedule:
    """A constant learning rate."""

    def __init__(self, options: Any) -> None:
        fault("schedule", "factory")

    def lr(
        self, step: int, *, peak: float, floor: float, warmup_steps: int, total_steps: int
    ) -> float:
        fault("schedule", "lr")
        return peak


@hookimpl
def register_datasets(register):
    register("faulty_text", TextSource, options=TextOptions)
    register("faulty_sums", ExampleSource, options=NoOptions)


@hookimpl
def register_tokenizers(register):
    register("faulty_tok", FaultyTokenizer, options=NoOptions)


@hookimpl
def register_templates(register):
    register("faulty_tpl", FaultyTemplate, options=NoOptions)


@hookimpl
def register_callbacks(register):
    register("faulty_cb", FaultyCallback, options=NoOptions)
    register("faulty_loss", LossFault, options=NoOptions)


@hookimpl
def register_eval_tasks(register):
    register("faulty_eval", FaultyTask, options=NoOptions)


@hookimpl
def register_optimizers(register):
    register("faulty_opt", FaultyOptimizer, options=NoOptions)


@hookimpl
def register_schedules(register):
    register("faulty_sched", FaultySchedule, options=NoOptions)


@hookimpl
def register_commands(cli):
    import click

    @cli.command(name="faulty")
    def faulty_command() -> None:
        """Raise when asked to."""
        fault("command", "callback")
        click.echo("no fault")
