"""Deciding whether a checkpoint may continue this run, and saying why not.

A results folder is tied to one experiment. Before a run continues from
``last.pth`` the core checks that the checkpoint was made by the same model
shape, the same tokenizer (a char vocabulary must match character for
character, not only in size), the same prepared data (its fingerprint), the
same experiment beyond its schedule (``config.json``'s, and the checkpoint's own
copy of it) and that every callback whose state was saved sits where it sat. Any difference is one
line listing what differs, and ``--fresh`` starts over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from nanogpt_core.config.experiment import ModelConfig, TrainConfig
from nanogpt_core.errors import NanoGPTError
from nanogpt_core.plugins.option_types import plain
from nanogpt_core.train.checkpoints import CheckpointError

# Keys of config.json that may change between a run and its resumption: the
# schedule (to train longer) and how a run is watched, never what it computes.
RESUMABLE_CHANGES = (
    "description",
    "train.epochs",
    "train.steps_per_epoch",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.save_every",
    "train.device",
    "train.compile",
    "train.peak_flops",
    "train.memory_check",
    # A run that the guards stopped resumes with a lower peak, or looser guards.
    "train.learning_rate",
    "train.min_lr",
    "train.spike_factor",
    "train.spike_window",
    "train.max_skips_in_a_row",
    # Recomputing activations changes memory and time, not the arithmetic.
    "train.activation_checkpointing",
    "train.distributed_timeout_s",
)


class ResumeMismatch(NanoGPTError):
    """The checkpoint in the results folder belongs to another experiment."""


def tokenizer_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between two tokenizer descriptions, in words, or None."""
    if saved == current:
        return None
    if saved.get("kind") != current.get("kind"):
        return f"tokenizer {saved.get('kind')!r} in the checkpoint, {current.get('kind')!r} now"
    if saved.get("kind") == "char" and saved.get("chars") != current.get("chars"):
        ours, theirs = set(saved.get("chars", "")), set(current.get("chars", ""))
        extra = "".join(sorted(theirs - ours))[:20]
        lost = "".join(sorted(ours - theirs))[:20]
        detail = ", ".join(
            part
            for part in (f"new {extra!r}" if extra else "", f"gone {lost!r}" if lost else "")
            if part
        )
        return (
            f"the char vocabulary differs ({len(ours)} characters in the checkpoint, "
            f"{len(theirs)} now{': ' + detail if detail else ', in another order'})"
        )
    return f"the {saved.get('kind')!r} tokenizer differs from the data's"


def mismatches(
    checkpoint: dict[str, Any],
    *,
    model_args: dict[str, Any],
    tokenizer: dict[str, Any],
    data_meta: dict[str, Any],
) -> list[str]:
    """What differs between a checkpoint and the run about to continue from it.

    :param model_args: the run's model shape, as a checkpoint's ``model_args`` holds it.
    """
    from nanogpt_core.model.config import GPTConfig, shape_differences

    saved, now = GPTConfig(**checkpoint["model_args"]), GPTConfig(**model_args)
    found = [
        f"model.{key} = {mine} now, {other} in the checkpoint"
        for key, mine, other in shape_differences(now, saved)
    ]
    difference = tokenizer_difference(checkpoint["tokenizer"], tokenizer)
    if difference:
        found.append(difference)
    saved_data = checkpoint["data"]
    for key in ("plugin", "variant", "fingerprint"):
        if saved_data.get(key) != data_meta.get(key):
            found.append(
                f"dataset {key} {saved_data.get(key)!r} in the checkpoint, "
                f"{data_meta.get(key)!r} now"
                + (" (its options or input files changed)" if key == "fingerprint" else "")
            )
    return found


def check_belongs(path: Path, checkpoint: dict[str, Any], **current: Any) -> None:
    """Refuse a checkpoint that :func:`mismatches` finds differences in."""
    found = mismatches(checkpoint, **current)
    if found:
        raise ResumeMismatch(
            f"{path} was made by another experiment: {'; '.join(found)}; "
            "restore the experiment or start over with --fresh"
        )


def callback_states(path: Path, saved: list[Any], plugins: list[str]) -> dict[int, dict[str, Any]]:
    """Each saved callback state, by the position it goes back to.

    :param saved: the checkpoint's ``callbacks`` list.
    :param plugins: the experiment's callback plugin names, in order.
    :raises ResumeMismatch: a callback with saved state is no longer at its position.
    """
    states: dict[int, dict[str, Any]] = {}
    for entry in saved:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("position"), int)
            and isinstance(entry.get("plugin"), str)
            and isinstance(entry.get("state"), dict)
        ):
            raise CheckpointError(f"{path}: callbacks: expected entries of position, plugin, state")
        position, plugin, state = entry["position"], entry["plugin"], entry["state"]
        if not state:
            continue  # nothing would be lost: order changes are harmless
        if position >= len(plugins) or plugins[position] != plugin:
            now = (
                f"the experiment's callbacks[{position}] is {plugins[position]!r}"
                if position < len(plugins)
                else f"the experiment has {len(plugins)} callback(s)"
            )
            raise ResumeMismatch(
                f"{path} holds the state of callbacks[{position}] = {plugin!r}, but {now}; "
                "list the callbacks as before, or start over with --fresh"
            )
        states[position] = state
    return states


def _flatten(table: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(table, dict):
        flat: dict[str, Any] = {}
        for key, value in table.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return flat
    return {prefix: table}


def _table_default(key: str) -> Any:
    """The default of a ``model.*`` or ``train.*`` option, or a marker when there is none."""
    table, _, name = key.partition(".")
    cls = {"model": ModelConfig, "train": TrainConfig}.get(table)
    fields = attrs.fields_dict(cls) if cls is not None else {}
    field = fields.get(name)
    if field is None or field.default is attrs.NOTHING or isinstance(field.default, attrs.Factory):
        return _NO_DEFAULT
    return field.default


_NO_DEFAULT = object()


def _missing_table(key: str, flat: dict[str, Any]) -> str | None:
    """The table (``train.muon``) holding ``key`` that ``flat`` lacks entirely, or None."""
    parts = key.split(".")
    for depth in range(2, len(parts)):
        table = ".".join(parts[:depth])
        if not any(k.startswith(table + ".") for k in flat):
            return table
    return None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two resolved experiments, beyond the schedule.

    A key the saved file lacks because it was written before the option existed
    (``model.position``, ``train.optimizer``) is no difference while it keeps its
    default: that is what the old run computed with. A plugin's table found on one
    side only (``[train.muon]`` once the optimizer changed) is one difference, not
    one per option.
    """
    # As JSON holds them: a checkpoint's pickled copy (or an experiment not yet
    # written) may hold a tuple where config.json holds a list.
    old, new = _flatten(plain(saved)), _flatten(plain(current))
    found = []
    tables: dict[str, str] = {}
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_CHANGES or old.get(key) == new.get(key):
            continue
        if key not in old and new.get(key) == _table_default(key):
            continue
        one_sided = _missing_table(key, old) or _missing_table(key, new)
        if one_sided:
            tables[one_sided] = (
                f"{one_sided}: a table there, (absent) now"
                if key in old
                else f"{one_sided}: (absent) there, a table now"
            )
            continue
        found.append(
            f"{key}: {json.dumps(old.get(key, '(absent)'))} there, "
            f"{json.dumps(new.get(key, '(absent)'))} now"
        )
    return sorted(found + list(tables.values()))


def check_same_config(path: Path, checkpoint: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a checkpoint whose own experiment differs from ``current`` beyond the schedule.

    The rule is ``config.json``'s (:func:`config_differences`); the checkpoint
    carries its experiment, so a results folder that lost its ``config.json``
    is still checked (a changed optimizer, or a changed ``[train.muon] lr``).
    """
    # Where the callbacks sit is callback_states' to judge: reordering callbacks
    # without state is harmless.
    found = config_differences(
        {k: v for k, v in checkpoint["config"].items() if k != "callbacks"},
        {k: v for k, v in current.items() if k != "callbacks"},
    )
    if found:
        shown = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
        raise ResumeMismatch(
            f"{path} was made by another experiment ({shown}); "
            "restore the experiment or start over with --fresh"
        )
