"""A plugin of every kind the README of release 0.1.0 (commit 85769ce) documented.

A byte tokenizer, a prompt template, a document dataset and an example dataset
(which uses both), a callback using the three requests, an eval task, an
optimizer, a schedule and a command, each written as that README and the
docstrings it pointed to said, importing only from ``nanogpt_core`` (its
``__all__`` then) and keeping torch inside functions.
"""

import json

import attrs

from nanogpt_core import (
    Callback,
    DataError,
    EvalResult,
    Template,
    Tokenizer,
    hookimpl,
    non_negative,
    one_of,
    option,
    positive,
)

# Tokenizer: one token per UTF-8 byte, and 256 ends a document.


@attrs.frozen(kw_only=True)
class BytesOptions:
    """The bytes tokenizer takes no options."""


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes; id 256 is end-of-text."""

    vocab_size = 257
    eot_id = 256

    def __init__(self, options=None):
        self.options = options

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def description(self):
        return {"kind": "compat_bytes", "vocab_size": self.vocab_size}

    @classmethod
    def from_description(cls, description):
        return cls()


# Template: a plain question and answer.


@attrs.frozen(kw_only=True)
class QAOptions:
    """Options of the Q/A template."""

    question: str = option("Q", "The word before the instruction.")


class QATemplate(Template):
    """``Q: instruction`` (and the input), then ``A: ``."""

    def __init__(self, options):
        self.options = options

    def prompt(self, instruction, input=""):
        extra = f"\n{input}" if input else ""
        return f"{self.options.question}: {instruction}{extra}\nA: "

    def description(self):
        return {"kind": "compat_qa", "question": self.options.question}

    def chat_template(self):
        return (
            "{% for m in messages %}{% if m.role == 'user' %}"
            + self.options.question
            + ": {{ m.content }}\nA: {% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
        )

    @classmethod
    def from_description(cls, description):
        return cls(QAOptions(question=description["question"]))


# Datasets: documents of sums, and examples of the same sums for the template.


@attrs.frozen(kw_only=True)
class SumsOptions:
    """Options of the sums datasets."""

    documents: int = option(
        400, "Training documents; a tenth as many for validation.", validator=positive
    )
    max_number: int = option(30, "Largest addend.", validator=positive)


def _sum(i, max_number):
    a, b = i % max_number, (i * 7) % max_number
    return a, b


class SumsSource:
    """Documents "a + b = c." with a documents() method, one split at a time."""

    tokenizer = "compat_bytes"
    description = "Sums (compat: 0.1.0 API)"

    def __init__(self, options):
        self.options = options
        self.variant = f"sums{options.max_number}"

    def documents(self, split, downloads):
        if split not in ("train", "val"):
            raise DataError(f"compat_sums: no split {split!r}")
        first = 0 if split == "train" else self.options.documents
        count = self.options.documents if split == "train" else self.options.documents // 10
        for i in range(first, first + count):
            a, b = _sum(i, self.options.max_number)
            yield f"{a} + {b} = {a + b}.\n"


class SumsExamples:
    """The same sums as instruction-tuning records, for the Q/A template."""

    tokenizer = "compat_bytes"
    template = "compat_qa"
    description = "Sums as examples (compat: 0.1.0 API)"

    def __init__(self, options):
        self.options = options
        self.variant = f"qa{options.max_number}"

    def examples(self, split, downloads):
        first = 0 if split == "train" else self.options.documents
        count = self.options.documents if split == "train" else self.options.documents // 10
        for i in range(first, first + count):
            a, b = _sum(i, self.options.max_number)
            yield {"instruction": f"{a} + {b}", "input": "", "output": str(a + b)}


# Callback: the three requests, on_checkpoint and on_metrics.


@attrs.frozen(kw_only=True)
class AuditOptions:
    """Options of the audit callback."""

    every_steps: int = option(
        4, "Log a metric and ask for a checkpoint this often.", validator=positive
    )


class AuditCallback(Callback):
    """Logs a metric, shares a text, asks for a checkpoint and keeps what it saw."""

    def __init__(self, options):
        self.options = options
        self.seen = {"steps": 0, "metrics_lines": 0, "checkpoints": 0, "train_starts": 0}

    def on_train_start(self, state):
        self.seen["train_starts"] += 1

    def on_step_end(self, state):
        self.seen["steps"] += 1
        if state.step % self.options.every_steps == 0:
            state.log_metrics({"compat/steps_seen": self.seen["steps"]})
            state.add_text("compat", f"step {state.step}")
            state.request_save(name="audit.pth")

    def on_checkpoint(self, state, path):
        self.seen["checkpoints"] += 1

    def on_metrics(self, state, record):
        self.seen["metrics_lines"] += 1

    def on_train_end(self, state):
        if state.is_main_process:
            record = {"seen": self.seen, "status": state.status, "step": state.step}
            (state.paths.root / "audit.json").write_text(json.dumps(record))

    def state_dict(self):
        return {"seen": dict(self.seen)}

    def load_state_dict(self, d):
        self.seen = dict(d["seen"])


# Eval task: is the sum the model's most likely continuation?


@attrs.frozen(kw_only=True)
class SumsTaskOptions:
    """Options of the sums eval task."""

    questions: int = option(8, "How many sums to ask.", validator=positive)


class SumsTask:
    """The log-likelihood of each sum's answer after "a + b = "."""

    def __init__(self, options):
        self.options = options

    def evaluate(self, evaluator):
        tok = evaluator.tokenizer
        examples = []
        for i in range(self.options.questions):
            a, b = _sum(i, 30)
            examples.append([(tok.encode(f"{a} + {b} = "), tok.encode(f"{a + b}."))])
        if evaluator.limit is not None:
            examples = examples[: evaluator.limit]
        results = evaluator.loglikelihood(examples)
        correct = sum(1 for (c,) in results if c.greedy)
        mean = sum(c.logprob for (c,) in results) / len(results)
        return EvalResult(
            metrics={"acc": correct / len(results), "logprob": mean},
            n=len(results),
            notes=(f"{len(results)} sums",),
        )


# Optimizer: plain SGD with momentum.


@attrs.frozen(kw_only=True)
class SGDOptions:
    """Options of the SGD optimizer."""

    momentum: float = option(0.9, "Momentum.", validator=non_negative)
    lr_scale: float = option(1.0, "Multiplies train.learning_rate.", validator=positive)


class SGDFactory:
    """torch.optim.SGD over every parameter."""

    def __init__(self, options):
        self.options = options

    def build(self, model, train, device_type):
        import torch

        lr = train.learning_rate * self.options.lr_scale
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=lr, momentum=self.options.momentum)


# Schedule: a step decay after warmup.


@attrs.frozen(kw_only=True)
class StepOptions:
    """Options of the step schedule."""

    drop_at: float = option(0.5, "Share of the steps after which the rate drops to the floor.")
    shape: str = option("step", "Only 'step'.", validator=one_of("step"))


class StepSchedule:
    """Warmup, the peak, then the floor from drop_at on."""

    def __init__(self, options):
        self.options = options

    def lr(self, step, *, peak, floor, warmup_steps, total_steps):
        if step < warmup_steps:
            return peak * (step + 1) / (warmup_steps + 1)
        return peak if step < self.options.drop_at * total_steps else floor


@hookimpl
def register_tokenizers(register):
    register("compat_bytes", BytesTokenizer, options=BytesOptions)


@hookimpl
def register_templates(register):
    register("compat_qa", QATemplate, options=QAOptions)


@hookimpl
def register_datasets(register):
    register("compat_sums", SumsSource, options=SumsOptions)
    register("compat_sums_qa", SumsExamples, options=SumsOptions)


@hookimpl
def register_callbacks(register):
    register("compat_audit", AuditCallback, options=AuditOptions)


@hookimpl
def register_eval_tasks(register):
    register("compat_sums", SumsTask, options=SumsTaskOptions)


@hookimpl
def register_optimizers(register):
    register("compat_sgd", SGDFactory, options=SGDOptions)


@hookimpl
def register_schedules(register):
    register("compat_step", StepSchedule, options=StepOptions)


@hookimpl
def register_commands(cli):
    @cli.command(name="compat-010")
    def compat_010():
        """Say that the 0.1.0-era command runs."""
        print("compat-010: command ran")
