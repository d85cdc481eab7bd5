"""Deciding whether a checkpoint may continue this run, and saying why not.

A results folder is tied to one experiment. Before a run continues from
``last.pth`` the core checks that the checkpoint was made by the same model
shape, the same tokenizer (a char vocabulary must match character for
character, not only in size), the same prepared data (its fingerprint) and that
every callback whose state was saved sits where it sat. Any difference is one
line listing what differs, and ``--fresh`` starts over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanogpt_core.errors import NanoGPTError
from nanogpt_core.train.checkpoints import CheckpointError


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
