"""The option tables of an experiment: frozen attrs classes, one per table.

``ExperimentConfig`` is a whole experiment file: its name and seed, the
``[dataset]``, ``[tokenizer]`` and ``[template]`` plugins (``PluginSpec``), the
``[model]`` table (``ModelConfig``: the model's shape, :class:`GPTConfig`, and
where its first weights come from), the ``[train]`` recipe (``TrainConfig``), the
``[[callbacks]]`` and the ``[eval.<task>]`` tables. Each field is declared with
``option``, so its default, doc and validator live here in one place;
``to_dict`` turns an experiment back into the shape of its TOML file
(``config.json``). Reading the file is :mod:`nanogpt_core.config.experiment_file`'s job.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from nanogpt_core.model.config import GPTConfig
from nanogpt_core.plugins.options import (
    INTERNAL_KEY,
    OptionValueError,
    fraction,
    non_negative,
    one_of,
    option,
    positive,
    show,
    unstructure,
)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Most file systems allow 255 bytes in a folder name; `--fresh` appends
# `.old-YYYYmmdd-HHMMSS-N` (up to 32 characters with a large N) to move old results aside.
MAX_NAME_LENGTH = 255 - 32
# numpy's seeds are unsigned 32-bit integers.
MAX_SEED = 2**32 - 1


def _valid_name(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    # fullmatch, not match with `$`: `$` also matches before a final newline.
    if not NAME_PATTERN.fullmatch(value):
        raise OptionValueError(
            attribute.name,
            f"{show(value)} is not usable as a folder name under results/ "
            "(use letters, digits, '.', '_' and '-')",
        )
    if len(value) > MAX_NAME_LENGTH:
        raise OptionValueError(
            attribute.name,
            f"{len(value)} characters is too long for a folder name under results/; "
            f"use at most {MAX_NAME_LENGTH}",
        )


def _valid_seed(_instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise OptionValueError(
            attribute.name, f"{value} is outside numpy's seed range; use 0 to {MAX_SEED}"
        )


def _valid_spike_factor(_instance: Any, attribute: attrs.Attribute, value: float) -> None:
    # At or below 1 about half of all healthy steps would be above the median.
    if value != 0 and value <= 1:
        raise OptionValueError(
            attribute.name, f"{value} would skip healthy steps; use 0 (off) or a factor above 1"
        )


@attrs.frozen(kw_only=True)
class ModelConfig(GPTConfig):
    """The ``[model]`` table: the model's shape (every :class:`GPTConfig` option) and
    the weights to start from."""

    init_from: str | None = option(
        None,
        "Weights to start from (fine-tuning): a toolkit checkpoint (.pth, weights only, "
        "a fresh optimizer) or a local Hugging Face GPT-2 folder; relative to the "
        "experiment file.",
        path=True,
    )


@attrs.frozen(kw_only=True)
class TrainConfig:
    """The training recipe: the ``[train]`` table."""

    batch_size: int = option(12, "Sequences per device per micro-step.", validator=positive)
    gradient_accumulation_steps: int = option(
        1, "Micro-steps per optimizer step.", validator=positive
    )
    epochs: int = option(1, "Number of epochs.", validator=positive)
    steps_per_epoch: int | None = option(
        None,
        "Optimizer steps per epoch. Default: one pass over the examples for fine-tuning "
        "data; 1000 for pre-training data (each step draws fresh random windows).",
        validator=positive,
    )
    optimizer: str = option(
        "adamw",
        'The optimizer: "adamw" (nanoGPT\'s), "muon" or another registered one; '
        "its options go in [train.<name>].",
    )
    schedule: str = option(
        "cosine",
        'The learning-rate schedule: "cosine" (nanoGPT\'s), "wsd", "linear", "constant" '
        "or another registered one; its options go in [train.<name>].",
    )
    learning_rate: float = option(
        6e-4,
        "Peak learning rate, reached after warmup (AdamW's; other optimizers' groups may have their own peaks).",
        validator=positive,
    )
    min_lr: float = option(
        6e-5,
        "Learning rate at the last step (the schedule's floor); other peaks decay to the "
        "same fraction of theirs.",
        validator=non_negative,
    )
    warmup_steps: int = option(100, "Linear warmup steps.", validator=non_negative)
    weight_decay: float = option(
        0.1, "AdamW weight decay (on 2-D weights only).", validator=non_negative
    )
    beta1: float = option(0.9, "AdamW beta1.", validator=fraction)
    beta2: float = option(0.95, "AdamW beta2.", validator=fraction)
    grad_clip: float = option(
        1.0, "Clip the gradient norm to this; 0 disables.", validator=non_negative
    )
    eval_every: int = option(
        250, "Evaluate train and val loss every this many steps.", validator=positive
    )
    eval_batches: int = option(50, "Batches per loss estimate.", validator=positive)
    log_every: int = option(10, "Write a metrics line every this many steps.", validator=positive)
    save_every: int | None = option(
        None,
        "Write checkpoints/last.pth every this many steps, so a killed run resumes from there. "
        "Default: at every evaluation (eval_every steps), as nanoGPT does; 0: only at epoch "
        "ends. Epoch ends, the end of the run and a stop (SIGTERM, Ctrl-C) always save.",
        validator=non_negative,
    )
    mixed_precision: str = option(
        "auto",
        'Autocast precision: "auto" (bf16 on GPUs with bf16 units, compute capability 8.0+; '
        'fp16 with loss scaling on older ones, e.g. V100; none on the CPU), "no", "fp16" '
        'or "bf16".',
        validator=one_of("auto", "no", "fp16", "bf16"),
    )
    compile: bool = option(False, "Wrap the model in torch.compile.")
    parallelism: str = option(
        "ddp",
        'How several processes share the work: "ddp" (data parallelism: every process holds '
        'the whole model, its gradients and optimizer state) or "fsdp" (PyTorch FSDP2: '
        "parameters, gradients and optimizer state sharded across the processes, one unit "
        "per transformer block; the optimizer state is saved sharded beside each checkpoint). "
        'With one process "fsdp" trains as "ddp" does and keeps the sharded checkpoint layout.',
        validator=one_of("ddp", "fsdp"),
    )
    device: str = option(
        "auto",
        '"auto" (CUDA when present), "cpu" or "cuda".',
        validator=one_of("auto", "cpu", "cuda"),
    )
    peak_flops: float | None = option(
        None,
        "Peak FLOP/s of one device for MFU. Default: the data-sheet figure of known GPUs "
        "(V100, A100, A10, L4, L40S, H100, H200 and their variants), else no MFU.",
        validator=positive,
    )
    group_by_length: bool = option(
        True,
        "Fine-tuning: batch examples of similar length together to cut padding.",
    )
    memory_check: bool = option(
        True,
        "Refuse to start when the estimated memory (weights, gradients, AdamW state and "
        "one micro-batch's activations) exceeds the device's free memory; false to skip.",
    )
    activation_checkpointing: bool = option(
        False,
        "Keep only each transformer block's input for the backward pass and recompute the "
        "rest (torch.utils.checkpoint): less activation memory for about a third more compute.",
    )
    spike_factor: float = option(
        0.0,
        "Skip a step whose loss or gradient norm exceeds this many times the median of the "
        "last spike_window accepted steps; 0 disables (nanoGPT's behaviour). Steps with a "
        "NaN or infinite loss or gradient norm are always skipped.",
        validator=_valid_spike_factor,
    )
    spike_window: int = option(
        128, "Accepted steps whose median spike_factor compares with.", validator=positive
    )
    max_skips_in_a_row: int = option(
        20,
        "Stop the run (exit 1, the last checkpoint kept) after this many skipped steps in a "
        "row; 1 stops at the first.",
        validator=positive,
    )
    distributed_timeout_s: int = option(
        1800,
        "Seconds a process waits for the others in one collective (a gradient all-reduce) "
        "before it stops with one line, so a hung node ends the run instead of blocking it; "
        "keep it above the longest thing the main process does alone (writing a checkpoint "
        "to shared storage, a main-only callback). Only runs of several processes use it.",
        validator=positive,
    )
    # The [train.<name>] tables, by plugin name. Not a key of [train] itself: the
    # first pass fills it with the raw tables; the second (resolve_plugins) with the
    # selected optimizer's and schedule's options instances only.
    plugin_options: dict[str, Any] = attrs.field(
        factory=dict, hash=False, metadata={INTERNAL_KEY: True}
    )

    @property
    def optimizer_options(self) -> Any:
        """The selected optimizer's options (its ``[train.<name>]`` table)."""
        return self.plugin_options.get(self.optimizer)

    @property
    def schedule_options(self) -> Any:
        """The selected schedule's options (its ``[train.<name>]`` table)."""
        return self.plugin_options.get(self.schedule)

    def __attrs_post_init__(self) -> None:
        if self.min_lr > self.learning_rate:
            raise OptionValueError(
                "min_lr", f"{self.min_lr} is above learning_rate = {self.learning_rate}"
            )


@attrs.frozen(kw_only=True)
class PluginSpec:
    """A ``[dataset]``, ``[tokenizer]``, ``[template]`` or ``[[callbacks]]`` table: a plugin's name and options.

    After the first pass ``options`` is the raw dict; after :func:`resolve_plugins`
    it is an instance of the options class the plugin registered.
    """

    plugin: str
    options: Any = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class ExperimentConfig:
    """A whole experiment, as read from an experiment file."""

    name: str = option(doc="Results go to results/<name>/.", validator=_valid_name)
    seed: int = option(1337, "Seed for initialisation and sampling.", validator=_valid_seed)
    description: str = option("", "What this experiment is for.")
    abstract: bool = option(
        False, "A base that exists only to be extended: `gpt run` and `gpt batch` refuse it."
    )
    dataset: PluginSpec = option(doc="The dataset plugin and its options.")
    tokenizer: PluginSpec | None = option(None, "A tokenizer plugin and its options.")
    template: PluginSpec | None = option(None, "A prompt template plugin and its options.")
    model: ModelConfig = option(doc="The model.", factory=ModelConfig)
    train: TrainConfig = option(doc="The training recipe.", factory=TrainConfig)
    callbacks: list[PluginSpec] = option(doc="Callbacks, called in this order.", factory=list)
    eval: dict[str, Any] = option(
        doc="Options of evaluation tasks, one [eval.<task>] table each.", factory=dict
    )

    def to_dict(self) -> dict[str, Any]:
        """The experiment as plain data, in the shape of the TOML file (for config.json)."""

        def table(spec: PluginSpec) -> dict[str, Any]:
            options = spec.options if isinstance(spec.options, dict) else unstructure(spec.options)
            return {"plugin": spec.plugin, **options}

        data: dict[str, Any] = {
            "name": self.name,
            "seed": self.seed,
            "description": self.description,
            "dataset": table(self.dataset),
        }
        if self.tokenizer is not None:
            data["tokenizer"] = table(self.tokenizer)
        if self.template is not None:
            data["template"] = table(self.template)
        train = unstructure(self.train)
        for name, options in self.train.plugin_options.items():
            values = options if isinstance(options, dict) else unstructure(options)
            if values:  # a plugin without options has no table to show
                train[name] = values
        data.update(
            model=unstructure(self.model),
            train=train,
            callbacks=[table(spec) for spec in self.callbacks],
        )
        # Only when set, so results folders of experiments without it compare equal.
        if self.eval:
            data["eval"] = {
                task: options if isinstance(options, dict) else unstructure(options)
                for task, options in self.eval.items()
            }
        return data
