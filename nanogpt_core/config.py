"""Experiment files: TOML in, frozen attrs classes out.

An experiment file names a dataset plugin, the model shape, the training recipe
and the callbacks to enable. Loading happens in two passes: the core sections are
structured first, with each plugin's table kept as a plain dict; then each of
those tables is structured into the options class its plugin registered. Every
problem found is reported as ``file: key.path: message``, one line each.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nanogpt_core.errors import ConfigError, PluginError
from nanogpt_core.options import (
    INTERNAL_KEY,
    OptionProblems,
    OptionValueError,
    fraction,
    join,
    non_negative,
    one_of,
    option,
    path_fields,
    positive,
    show,
    structure,
    suggest,
    unstructure,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from nanogpt_core.plugins import Plugins


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


@attrs.frozen(kw_only=True)
class ModelConfig:
    """The GPT architecture: the ``[model]`` table."""

    n_layer: int = option(12, "Number of transformer blocks.", validator=positive)
    n_head: int = option(12, "Attention heads per block; must divide n_embd.", validator=positive)
    n_embd: int = option(768, "Width of the residual stream.", validator=positive)
    block_size: int = option(1024, "Context length in tokens.", validator=positive)
    dropout: float = option(
        0.0, "Dropout probability; 0 for pre-training, 0.1+ for fine-tuning.", validator=fraction
    )
    bias: bool = option(
        False,
        "Bias in Linear and LayerNorm layers (GPT-2 has them; without is a bit better and faster).",
    )
    position: str = option(
        "learned",
        'Positions: "learned" (a learned vector per position, GPT-2) or "rope" (rotary '
        "embeddings of queries and keys, Llama; no position weights).",
        validator=one_of("learned", "rope"),
    )
    rope_theta: float | None = option(
        None,
        'RoPE base frequency; 10000.0 when left out. Only with position = "rope".',
        validator=positive,
    )
    norm: str = option(
        "layernorm",
        '"layernorm" (GPT-2) or "rmsnorm" (scale only, never a bias; Llama).',
        validator=one_of("layernorm", "rmsnorm"),
    )
    mlp: str = option(
        "gelu",
        '"gelu" (GPT-2, 4x wide), "swiglu" (Llama; 8/3x wide, rounded up to a multiple '
        'of 64, for the same parameters) or "relu2" (ReLU squared, 4x wide).',
        validator=one_of("gelu", "swiglu", "relu2"),
    )
    qk_norm: bool = option(
        False, "RMSNorm of each head's queries and keys before attention (steadier training)."
    )
    tie_embeddings: bool = option(
        True, "The output layer reuses the token embedding (GPT-2); false gives it its own."
    )
    logit_softcap: float | None = option(
        None,
        "Squash the output logits into (-cap, cap) with cap * tanh(logits / cap) (Gemma 2 "
        "uses 30); none by default.",
        validator=positive,
    )
    vocab_size: int | None = option(
        None,
        "Vocabulary size. Default: the prepared data's, padded up to a multiple of 64 for speed.",
        validator=positive,
    )
    init_from: str | None = option(
        None,
        "Weights to start from (fine-tuning): a toolkit checkpoint (.pth, weights only, "
        "a fresh optimizer) or a local Hugging Face GPT-2 folder; relative to the "
        "experiment file.",
        path=True,
    )

    def __attrs_post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise OptionValueError(
                "n_embd", f"{self.n_embd} is not divisible by n_head = {self.n_head}"
            )
        head_size = self.n_embd // self.n_head
        if self.position == "rope" and head_size % 2:
            raise OptionValueError(
                "position",
                f'"rope" rotates pairs of channels and needs an even head size, but n_embd / '
                f"n_head = {self.n_embd} / {self.n_head} = {head_size}",
            )
        if self.rope_theta is not None and self.position != "rope":
            raise OptionValueError(
                "rope_theta",
                'is only used with position = "rope"; remove it or set position = "rope"',
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
        "Peak learning rate, reached after warmup (AdamW's, and the one metrics.jsonl shows).",
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
    mixed_precision: str = option(
        "auto",
        'Autocast precision: "auto" (bf16 on GPUs with bf16 units, compute capability 8.0+; '
        'fp16 with loss scaling on older ones, e.g. V100; none on the CPU), "no", "fp16" '
        'or "bf16".',
        validator=one_of("auto", "no", "fp16", "bf16"),
    )
    compile: bool = option(False, "Wrap the model in torch.compile.")
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
        "Refuse to start when the estimated parameter + optimizer memory exceeds the "
        "device's free memory; false to skip.",
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


# Reading TOML, with `extends`.


def read_toml(path: Path, shown: str) -> dict[str, Any]:
    """Parse one TOML file; syntax errors name the file, line and column."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"{shown}: file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{shown}: is a folder, expected a .toml experiment file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{shown}: invalid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{shown}: not UTF-8 text: {exc.reason}"]) from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge two TOML tables; ``override`` wins, tables merge, arrays are replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Where each value came from, so relative paths resolve against the folder of the
# file that wrote them: key path (("dataset", "path"), ("callbacks",)) -> folder.
# Only leaves are recorded; arrays are leaves, since they are replaced whole.
Origins = dict[tuple[str | int, ...], Path]


def _set_origin(origins: Origins, key: tuple[str | int, ...], folder: Path) -> None:
    """Record that ``key`` was set in ``folder``, forgetting what it replaced below it."""
    for old in [k for k in origins if k[: len(key)] == key]:
        del origins[old]
    origins[key] = folder


def _leaf_origins(
    table: dict[str, Any], folder: Path, prefix: tuple[str | int, ...] = ()
) -> Origins:
    origins: Origins = {}
    for key, value in table.items():
        if isinstance(value, dict):
            origins.update(_leaf_origins(value, folder, (*prefix, key)))
        else:
            origins[(*prefix, key)] = folder
    return origins


def origin_of(origins: Origins, key: tuple[str | int, ...]) -> Path:
    """The folder of the file (or ``--set``) that set ``key``: its nearest recorded ancestor."""
    for end in range(len(key), 0, -1):
        if key[:end] in origins:
            return origins[key[:end]]
    return Path.cwd()


def read_experiment_file(
    path: Path, shown: str | None = None, _chain: tuple[Path, ...] = ()
) -> dict:
    """Read an experiment file and the files it ``extends``, merged into one table."""
    return _read_with_origins(path, shown or str(path), _chain)[0]


def _read_with_origins(
    path: Path, shown: str, chain: tuple[Path, ...]
) -> tuple[dict[str, Any], Origins]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(p.name for p in (*chain, resolved))
        raise ConfigError([f"{shown}: extends: cycle {cycle}"])
    data = read_toml(path, shown)
    parent = data.pop("extends", None)
    # abspath also folds the `..` of `extends = "../base.toml"` out of the folder.
    origins = _leaf_origins(data, Path(os.path.abspath(path.parent)))
    if parent is None:
        return data, origins
    if not isinstance(parent, str):
        raise ConfigError([f"{shown}: extends: expected a file name (string), got {parent!r}"])
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise ConfigError([f"{shown}: extends: file not found: {parent_path}"])
    base, merged_origins = _read_with_origins(parent_path, str(parent_path), (*chain, resolved))
    # `abstract` marks one file as a base, and `name` one experiment's results
    # folder: neither is inherited (a file's name defaults to its own stem).
    base.pop("abstract", None)
    base.pop("name", None)
    for key, folder in origins.items():
        _set_origin(merged_origins, key, folder)
    return deep_merge(base, data), merged_origins


# --set overrides.

_KEY_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)(?:\[(\d+)\])?$")


def parse_value(text: str) -> Any:
    """Read an override's value as a TOML literal; a bare word is a string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> tuple[str | int, ...]:
    """Apply one ``--set key.path=value`` to the raw experiment table, in place.

    ``callbacks[0].every_steps`` picks a callback by position and
    ``callbacks.checkpoint.every_steps`` by plugin name.

    :returns: the key path that was set, with array positions as ints.
    """
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            [f"--set {assignment}: expected KEY=VALUE, e.g. train.learning_rate=3e-4"]
        )
    parts = key.strip().split(".")
    node: Any = data
    where: list[str | int] = []
    for i, part in enumerate(parts):
        match = _KEY_PART.match(part)
        if not match:
            raise ConfigError([f"--set {assignment}: {part!r} is not a key"])
        name, index = match.group(1), match.group(2)
        last = i == len(parts) - 1
        if isinstance(node, list):
            # `callbacks.checkpoint`: the table in the array whose plugin is that name.
            tables = [t for t in node if isinstance(t, dict) and t.get("plugin") == name]
            if not tables:
                raise ConfigError([f"--set {assignment}: no table with plugin = {name!r}"])
            where.append(next(j for j, t in enumerate(node) if t is tables[0]))
            node = tables[0]
            if last:
                raise ConfigError([f"--set {assignment}: name a key inside the {name!r} table"])
            continue
        if not isinstance(node, dict):
            raise ConfigError([f"--set {assignment}: {'.'.join(parts[:i])} is not a table"])
        if index is not None:
            array = node.get(name)
            if not isinstance(array, list) or int(index) >= len(array):
                raise ConfigError([f"--set {assignment}: {name}[{index}] does not exist"])
            where.extend((name, int(index)))
            if last:
                array[int(index)] = parse_value(text)
            node = array[int(index)]
        elif last:
            where.append(name)
            node[name] = parse_value(text)
        else:
            where.append(name)
            node = node.setdefault(name, {})
    return tuple(where)


# Structuring.


def _split_plugin_table(table: Any) -> Any:
    """``{"plugin": "x", "a": 1}`` -> ``{"plugin": "x", "options": {"a": 1}}``."""
    if not isinstance(table, dict):
        return table
    options = {k: v for k, v in table.items() if k != "plugin"}
    split: dict[str, Any] = {"options": options}
    if "plugin" in table:
        split["plugin"] = table["plugin"]
    return split


def _split_train_tables(train: Any) -> dict[str, Any]:
    """Take the ``[train.<name>]`` tables (optimizer and schedule options) out of ``[train]``.

    A table under a key of ``[train]`` itself (``train.batch_size = {}``) stays, for
    the type check to report.
    """
    if not isinstance(train, dict):
        return {}
    keys = {field.name for field in attrs.fields(TrainConfig)}
    tables = {k: v for k, v in train.items() if isinstance(v, dict) and k not in keys}
    for name in tables:
        del train[name]
    return tables


def load_experiment(
    path: str | Path,
    overrides: tuple[str, ...] | list[str] = (),
    plugins: Plugins | None = None,
) -> ExperimentConfig:
    """Load an experiment file, apply ``--set`` overrides and check every option.

    :param plugins: when given, each plugin table is checked against the options
        class its plugin registered (the second pass); without it options stay dicts.
    :raises ConfigError: listing every problem, one line each.
    """
    shown = str(path)
    path = Path(path)
    data, origins = _read_with_origins(path, shown, ())
    for assignment in overrides:
        try:
            key = apply_override(data, assignment)
        except ConfigError as exc:
            raise ConfigError([f"{shown}: {p}" for p in exc.problems]) from None
        # A path given on the command line means what it means in the shell.
        _set_origin(origins, key, Path.cwd())
    resolve_paths(data, origins, plugins)
    data.setdefault("name", path.stem)
    for table in ("dataset", "tokenizer", "template"):
        if isinstance(data.get(table), dict):
            data[table] = _split_plugin_table(data[table])
    if isinstance(data.get("callbacks"), list):
        data["callbacks"] = [_split_plugin_table(t) for t in data["callbacks"]]
    train_tables = _split_train_tables(data.get("train"))
    try:
        config = structure(data, ExperimentConfig)
    except OptionProblems as exc:
        raise ConfigError([f"{shown}: {_tidy(p)}" for p in exc.problems]) from None
    if train_tables:
        config = attrs.evolve(config, train=attrs.evolve(config.train, plugin_options=train_tables))
    if plugins is not None:
        config = resolve_plugins(config, plugins, shown)
    return config


def resolve_paths(data: dict[str, Any], origins: Origins, plugins: Plugins | None) -> None:
    """Make relative paths absolute against the folder of the file that set them, in place.

    ``model.init_from`` and every plugin option declared with ``option(..., path=True)``
    (known only when ``plugins`` is given); ``~`` is expanded. Values of the wrong
    type are left alone for the type check to report.
    """
    _resolve_keys(data.get("model"), ["init_from"], ("model",), origins)
    if plugins is None:
        return
    tables: list[tuple[Any, dict[str, Any], tuple[str | int, ...]]] = [
        (data.get("dataset"), plugins.datasets(), ("dataset",)),
        (data.get("tokenizer"), plugins.tokenizers(), ("tokenizer",)),
        (data.get("template"), plugins.templates(), ("template",)),
    ]
    if isinstance(data.get("callbacks"), list):
        callbacks = plugins.callbacks()
        tables += [(t, callbacks, ("callbacks", i)) for i, t in enumerate(data["callbacks"])]
    if isinstance(data.get("train"), dict):
        for name, table in data["train"].items():
            try:
                registration = _train_table_owner(plugins, name)
            except PluginError:
                continue  # a name two plugins registered: the second pass reports it
            if isinstance(table, dict) and registration is not None:
                _resolve_keys(table, path_fields(registration.options), ("train", name), origins)
    for table, registry, key in tables:
        if isinstance(table, dict) and isinstance(table.get("plugin"), str):
            try:
                registration = registry.get(table["plugin"])
            except PluginError:
                continue  # a name two plugins registered: the second pass reports it
            if registration is not None:
                _resolve_keys(table, path_fields(registration.options), key, origins)
    _resolve_eval_paths(data.get("eval"), plugins, origins)


def _resolve_eval_paths(tables: Any, plugins: Plugins, origins: Origins) -> None:
    """Path options of ``[eval.<task>]`` tables, which name their plugin by their key."""
    if not isinstance(tables, dict):
        return
    registry = plugins.eval_tasks()
    for task, table in tables.items():
        try:
            registration = registry.get(task)
        except PluginError:
            continue
        if registration is not None:
            _resolve_keys(table, path_fields(registration.options), ("eval", task), origins)


def _train_table_owner(plugins: Plugins, name: str) -> Any:
    """The optimizer or schedule registration a ``[train.<name>]`` table belongs to, or None.

    A name registered as both kinds is the optimizer's; a name two plugins
    registered raises the conflict's :class:`PluginError`.
    """
    for kind in ("optimizer", "schedule"):
        registration = plugins.registry(kind).get(name)
        if registration is not None:
            return registration
    return None


def _resolve_keys(
    table: Any, names: list[str], prefix: tuple[str | int, ...], origins: Origins
) -> None:
    if not isinstance(table, dict):
        return
    for name in names:
        value = table.get(name)
        folder = origin_of(origins, (*prefix, name))
        if isinstance(value, str):
            table[name] = _resolve_path(value, folder)
        elif isinstance(value, list):
            table[name] = [_resolve_path(v, folder) if isinstance(v, str) else v for v in value]


def _resolve_path(value: str, folder: Path) -> str:
    if not value:
        return value  # "" is no path at all; the plugin's own check reports it
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else folder / path)


def _tidy(problem: str) -> str:
    # The split of plugin tables is ours, not the user's: hide ".options" in paths.
    return problem.replace(".options.", ".").replace(".options:", ":")


def resolve_plugins(config: ExperimentConfig, plugins: Plugins, source: str) -> ExperimentConfig:
    """Second pass: structure each plugin table into its plugin's options class.

    :param source: the experiment file's name, which starts every problem line.
    """
    problems: list[str] = []
    datasets = plugins.datasets()
    callbacks = plugins.callbacks()
    tokenizers = plugins.tokenizers()

    def resolve(spec: PluginSpec, registry: dict[str, Any], kind: str, path: str) -> PluginSpec:
        registration = registry.get(spec.plugin)
        if registration is None:
            installed = ", ".join(sorted(registry)) or "none"
            problems.append(
                f"{join(path, 'plugin')}: no {kind} plugin named {spec.plugin!r}"
                f"{suggest(spec.plugin, list(registry))}; installed: {installed}"
            )
            return spec
        try:
            options = structure(spec.options, registration.options, path)
        except OptionProblems as exc:
            problems.extend(exc.problems)
            return spec
        return attrs.evolve(spec, options=options)

    dataset = resolve(config.dataset, datasets, "dataset", "dataset")
    tokenizer = config.tokenizer and resolve(config.tokenizer, tokenizers, "tokenizer", "tokenizer")
    template = config.template and resolve(
        config.template, plugins.templates(), "template", "template"
    )
    resolved_callbacks = [
        resolve(spec, callbacks, "callback", f"callbacks[{i}]")
        for i, spec in enumerate(config.callbacks)
    ]
    eval_options = {
        task: resolve_eval_table(task, table, plugins, problems)
        for task, table in config.eval.items()
    }
    names = [spec.plugin for spec in config.callbacks]
    for i, name in enumerate(names):
        if name in names[:i]:
            problems.append(f"callbacks[{i}].plugin: {name!r} is already enabled above")
    train = resolve_train_tables(config.train, plugins, problems)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    return attrs.evolve(
        config,
        dataset=dataset,
        tokenizer=tokenizer,
        template=template,
        callbacks=resolved_callbacks,
        train=train,
        eval=eval_options,
    )


def resolve_eval_table(task: str, table: Any, plugins: Plugins, problems: list[str]) -> Any:
    """One ``[eval.<task>]`` table structured into the task's options (problems appended)."""
    from nanogpt_core.eval_suite import check_task_names

    path = join("eval", task)
    try:
        check_task_names([task], plugins, path)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return table
    registration = plugins.eval_tasks()[task]
    try:
        return structure(table, registration.options, path)
    except OptionProblems as exc:
        problems.extend(exc.problems)
        return table


def resolve_train_tables(train: TrainConfig, plugins: Plugins, problems: list[str]) -> TrainConfig:
    """Second pass for ``[train]``: the selected optimizer and schedule, and their tables.

    The selected plugins' tables (absent ones too: their defaults) become their
    options instances. A table for a registered optimizer or schedule that is not
    selected is checked and then left out, so ``--set train.optimizer=adamw`` works on
    an experiment with a ``[train.muon]`` table. A table naming neither is a problem.
    Problems are appended to ``problems``.
    """
    resolved: dict[str, Any] = {}
    selected = {"optimizer": train.optimizer, "schedule": train.schedule}
    for kind, name in selected.items():
        registry = plugins.registry(kind)
        try:
            registration = registry.get(name)
        except PluginError as exc:
            problems.append(f"train.{kind}: {exc}")
            continue
        if registration is None:
            installed = ", ".join(sorted(registry)) or "none"
            problems.append(
                f"train.{kind}: no {kind} named {name!r}{suggest(name, list(registry))}; "
                f"installed: {installed}"
            )
            continue
        options = _structure_train_table(train, name, registration, problems)
        if options is not None:
            resolved[name] = options
    for name in train.plugin_options:
        if name in selected.values():
            continue
        try:
            registration = _train_table_owner(plugins, name)
        except PluginError as exc:
            problems.append(f"train.{name}: {exc}")
            continue
        if registration is None:
            known = sorted({*plugins.optimizers(), *plugins.schedules()})
            problems.append(
                f"train.{name}: unknown table: no optimizer or schedule is named "
                f"{name!r}{suggest(name, known)}; optimizers: "
                f"{', '.join(sorted(plugins.optimizers())) or 'none'}; schedules: "
                f"{', '.join(sorted(plugins.schedules())) or 'none'}"
            )
            continue
        _structure_train_table(train, name, registration, problems)  # checked, not used
    return attrs.evolve(train, plugin_options=resolved)


def _structure_train_table(
    train: TrainConfig, name: str, registration: Any, problems: list[str]
) -> Any:
    table = train.plugin_options.get(name, {})
    if not isinstance(table, dict):  # already structured (a config resolved twice)
        return table
    try:
        return structure(table, registration.options, f"train.{name}")
    except OptionProblems as exc:
        problems.extend(exc.problems)
        return None
