"""Checkpoint files: what they hold, how they are written, how they are checked.

The core owns this format; the ``checkpoint`` plugin only decides when to save
and which files to keep. A checkpoint is a dict of tensors and plain containers
(so :func:`load_checkpoint` can insist on ``torch.load(weights_only=True)``: a
file that would need pickled code is refused, never executed), written to a
temporary file and renamed into place, with a checksum of its whole payload. On
load the file is checked before anything uses it: readable, the checksum matches,
and every key the purpose needs is there with the right type. Each failure is one
:class:`CheckpointError` line naming the file.

Keys (``FORMAT`` 2):

======================  ======================================================
``format``              this layout's version
``version``             the toolkit's version that wrote it
``model_args``          the architecture (``GPTConfig``'s fields; later ones default on load)
``model``               the weights, unwrapped, full precision, on the CPU
``tokenizer``           the tokenizer's description (a char vocabulary in full)
``step``, ``epoch``     optimizer steps done, current epoch
``optimizer``           the optimizer's ``state_dict``
``scaler``              fp16 loss scaler state, or None
``elapsed_s``           training seconds so far, across resumes
``metrics``             the latest metrics (so a run resumed at its end can report them)
``ranks``               per process: its sampler state and RNG states
``callbacks``           per enabled callback: ``{"position", "plugin", "state"}``
``config``              the resolved experiment
``data``                the prepared data's ``plugin``, ``variant`` and ``fingerprint``
``checksum``            sha256 over every other key
======================  ======================================================
"""

from __future__ import annotations

import collections
import hashlib
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from nanogpt_core.errors import NanoGPTError
from nanogpt_core.files import atomic_write

FORMAT = 2

# What each use needs, with the types it needs them in (checked on load).
MODEL_KEYS: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "model_args": dict,
    "step": int,
    "tokenizer": dict,
}
RESUME_KEYS: dict[str, type | tuple[type, ...]] = {
    **MODEL_KEYS,
    "format": int,
    "epoch": int,
    "optimizer": dict,
    "elapsed_s": (int, float),
    "metrics": dict,
    "ranks": list,
    "callbacks": list,
    "config": dict,
    "data": dict,
}
# The architecture options every checkpoint has had since the first. Every other
# GPTConfig field came later: a checkpoint without one was trained before that
# option existed, with what its default describes, so load_checkpoint fills it in.
FIRST_MODEL_ARGS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


class CheckpointError(NanoGPTError):
    """A checkpoint that cannot or must not be loaded."""


# -- checksum ------------------------------------------------------------------


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of nested dicts/lists/tuples, with a stable path, in a stable order."""
    if isinstance(value, dict):
        for key in sorted(value, key=repr):
            yield from _leaves(value[key], f"{path}/{key!r}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def payload_checksum(checkpoint: dict[str, Any]) -> str:
    """sha256 over every key but ``checksum``: tensors by dtype, shape and bytes, the rest by repr."""
    import torch

    digest = hashlib.sha256()
    for path, leaf in _leaves({k: v for k, v in checkpoint.items() if k != "checksum"}):
        digest.update(path.encode())
        if isinstance(leaf, torch.Tensor):
            tensor = leaf.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            # Viewing the bytes as uint8 works for every dtype, bfloat16 included.
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
        else:
            digest.update(repr(leaf).encode())
    return digest.hexdigest()


# -- plain data ----------------------------------------------------------------

# What a checkpoint may hold besides tensors: what torch.load(weights_only=True)
# reads back without running code, and what payload_checksum walks in a stable
# order. Exact types: a numpy float or a str enum is a subclass that pickles as
# its own class, which the loader then refuses.
PLAIN_LEAVES = (type(None), bool, int, float, str)
PLAIN_DEPTH = 64
PLAIN_DATA = "numbers, strings, bools, None, lists, tuples, dicts with string keys, tensors"


def plain_data_problem(value: Any, where: str, depth: int = 0) -> str | None:
    """What in ``value`` is not plain data, naming where it sits; None when all of it is.

    Plain data is :data:`PLAIN_DATA` (integer dict keys pass too: they load).
    """
    import torch

    kind = type(value)
    if kind in PLAIN_LEAVES or kind in (torch.Tensor, torch.nn.Parameter):
        return None
    if depth > PLAIN_DEPTH:
        return f"{where} nests deeper than {PLAIN_DEPTH} levels (a cycle?)"
    if kind in (dict, collections.OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int):
                return f"{where} has the key {key!r:.40}, a {_qualified(key)}, not a string"
            problem = plain_data_problem(item, f"{where}[{key!r}]", depth + 1)
            if problem:
                return problem
        return None
    if kind in (list, tuple):
        for index, item in enumerate(value):
            problem = plain_data_problem(item, f"{where}[{index}]", depth + 1)
            if problem:
                return problem
        return None
    return f"{where} is a {_qualified(value)}"


def _qualified(value: Any) -> str:
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


# -- writing -------------------------------------------------------------------


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` with its checksum, through a temporary file and a rename.

    :raises StorageError: the disk is full or the folder read-only; the previous
        file at ``path`` stays as it was.
    """
    import torch

    payload = {**checkpoint, "checksum": payload_checksum(checkpoint)}
    atomic_write(Path(path), lambda handle: torch.save(payload, handle))


# -- reading -------------------------------------------------------------------


def load_checkpoint(
    path: Path, map_location: Any = "cpu", *, resume: bool = False
) -> dict[str, Any]:
    """Read and check a checkpoint, refusing every problem in one line.

    :param resume: also require what resuming a run needs (optimizer, samplers,
        RNG, callbacks' states, ...); without it, what sampling and export need.
    :raises CheckpointError: missing, unreadable, damaged (checksum), unsafe
        (pickled code), or lacking a key the purpose needs.
    """
    path = Path(path)
    checkpoint = _read(path, map_location)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a nanogpt checkpoint (not a dict of keys)")
    _check_keys(path, checkpoint, RESUME_KEYS if resume else MODEL_KEYS)
    _check_model_args(path, checkpoint["model_args"])
    tokenizer = checkpoint["tokenizer"]
    if not isinstance(tokenizer.get("kind"), str) or not isinstance(
        tokenizer.get("vocab_size"), int
    ):
        raise CheckpointError(f"{path}: tokenizer: expected a table with 'kind' and 'vocab_size'")
    _check_checksum(path, checkpoint, required=resume)
    checkpoint["model_args"] = _complete_model_args(path, checkpoint["model_args"])
    _check_weights_finite(path, checkpoint["model"])
    return checkpoint


def _read(path: Path, map_location: Any) -> Any:
    import torch

    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a .pth checkpoint file")
    if not path.is_file():
        # A FIFO would block the read forever and /dev/zero never ends.
        raise CheckpointError(f"{path}: not a regular file, expected a .pth checkpoint file")
    # torch.save writes a zip archive; anything else is damaged or not ours.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt: not a torch zip archive)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = [line.strip() for line in str(exc).splitlines() if line.strip()] or ["?"]
        culprit = next((line for line in detail if "global" in line.lower()), None)
        if culprit is None:
            raise CheckpointError(
                f"{path}: not a readable checkpoint (truncated or corrupt: {detail[0]})"
            ) from None
        # weights_only refuses any global it does not know: that is pickled code.
        raise CheckpointError(
            f"{path}: refused: loading it would run pickled code ({culprit}); only checkpoints "
            "of tensors and plain containers are loaded"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError, ... on damage
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {first})"
        ) from None


def _type_name(expected: type | tuple[type, ...]) -> str:
    names = {
        dict: "a table",
        list: "a list",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        str: "a string",
        type(None): "none",
    }
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(names.get(t, t.__name__) for t in types)


def _has_type(value: Any, expected: type | tuple[type, ...]) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    # bool is an int subclass, but True is never a step count.
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _check_keys(path: Path, checkpoint: dict[str, Any], keys: dict[str, Any]) -> None:
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path}: not a usable nanogpt checkpoint: missing {', '.join(missing)}"
            + ("" if "model" not in missing else " (is it a nanogpt checkpoint?)")
        )
    for key, expected in keys.items():
        if not _has_type(checkpoint[key], expected):
            raise CheckpointError(
                f"{path}: {key} is {type(checkpoint[key]).__name__}, expected {_type_name(expected)}"
            )


def _model_arg_types() -> dict[str, tuple[type, ...]]:
    """Each ``GPTConfig`` field's accepted types, read from its annotation.

    An integer is a number too (``dropout = 0`` is 0.0); only the first
    options must be set (a vocabulary size, never none).
    """
    import types
    import typing

    from nanogpt_core.model.config import GPTConfig

    accepted: dict[str, tuple[type, ...]] = {}
    for field in attrs.fields(attrs.resolve_types(GPTConfig)):
        kinds = field.type.__args__ if isinstance(field.type, types.UnionType) else (field.type,)
        kinds = tuple(typing.cast(type, kind) for kind in kinds)
        if float in kinds:
            kinds = (int, *kinds)
        if field.name in FIRST_MODEL_ARGS:
            kinds = tuple(kind for kind in kinds if kind is not type(None))
        accepted[field.name] = kinds
    return accepted


def _check_model_args(path: Path, args: dict[str, Any]) -> None:
    expected_types = _model_arg_types()
    unknown = sorted(set(args) - set(expected_types))
    if unknown:
        raise CheckpointError(
            f"{path}: model_args.{unknown[0]} is unknown to this nanogpt "
            "(written by a newer version?)"
        )
    for key, expected in expected_types.items():
        if key not in args:
            if key not in FIRST_MODEL_ARGS:
                continue
            raise CheckpointError(f"{path}: model_args lacks {key}")
        if not _has_type(args[key], expected):
            raise CheckpointError(
                f"{path}: model_args.{key} is {type(args[key]).__name__}, "
                f"expected {_type_name(expected)}"
            )


def _complete_model_args(path: Path, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with the defaults of options it predates, checked as a whole.

    Checkpoints written before ``rope_theta`` could be left out hold the
    default base (10000.0) even for learned positions, which never use it:
    there it is dropped, as an experiment that leaves it out would have it.
    """
    from nanogpt_core.model.config import GPTConfig

    complete = dict(args)
    if complete.get("position", "learned") != "rope":
        complete.pop("rope_theta", None)
    try:
        return attrs.asdict(GPTConfig(**complete))
    except ValueError as exc:
        raise CheckpointError(f"{path}: model_args: {exc}") from None


def _check_weights_finite(path: Path, weights: dict[str, Any]) -> None:
    """Refuse weights holding NaN or infinity: a valid checksum can cover a diverged model."""
    import torch

    for name, tensor in weights.items():
        if (
            isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point()
            and not bool(torch.isfinite(tensor).all())
        ):
            raise CheckpointError(
                f"{path}: the weights are not finite (NaN or infinity in {name}): the run "
                "diverged before it was saved; use an earlier checkpoint"
            )


def _check_checksum(path: Path, checkpoint: dict[str, Any], *, required: bool) -> None:
    saved = checkpoint.get("checksum")
    if saved is None:
        if required:
            raise CheckpointError(f"{path}: has no checksum (written by an older nanogpt)")
        return  # an older checkpoint: usable for sampling and export, unverified
    if payload_checksum(checkpoint) != saved:
        raise CheckpointError(
            f"{path}: damaged: its contents do not match the checksum written with it "
            "(a flipped byte or a partial copy); use another checkpoint"
        )
