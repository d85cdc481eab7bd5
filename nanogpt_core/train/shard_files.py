"""The sharded part of an FSDP run's checkpoint: optimizer state saved with ``torch.distributed.checkpoint``.

Under ``[train] parallelism = "fsdp"`` a checkpoint is two things beside each
other in ``checkpoints/``:

- the ``.pth`` file (``last.pth``, a callback's ``epoch_0003.pth``), written
  by the main process exactly as under DDP (``checkpoints.py``): the whole
  model's weights gathered in full precision, so ``gpt sample``, ``chat``,
  ``serve``, ``eval``, ``export`` and ``model.init_from`` read it unchanged;
  its ``optimizer`` is empty and its ``shards`` key names the folder below
  with that folder's checksum;
- a folder ``<file>.shards-<step>`` (``last.pth.shards-000050``) holding the
  optimizer's tensors as ``torch.distributed.checkpoint`` (DCP) writes them:
  each process writes its own rows, and a later run at another process count
  reads back the rows it needs (DCP reshards on load). The optimizer state's
  plain part (param groups, counters) stays in the ``.pth``'s ``optimizer``,
  with a marker where each tensor was.

The order keeps a kill at any moment harmless: the folder is written under a
``.tmp`` name and renamed, then the ``.pth`` naming it is written and renamed
into place, and only then is the previous folder removed. Until the new
``.pth`` is in place the previous one names a folder that still exists.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from nanogpt_core.train.checkpoints import CheckpointError

SHARDS = ".shards-"
TMP = ".tmp"
# What the .pth holds where the optimizer state had a tensor (None means None there).
IN_SHARDS = "<tensor in the shard folder>"


def shard_folder(path: Path, step: int) -> Path:
    """Where the optimizer shards of the checkpoint file ``path`` saved at ``step`` go."""
    return path.with_name(f"{path.name}{SHARDS}{step:06d}")


def folder_checksum(folder: Path) -> str:
    """sha256 over every file of ``folder``: relative paths and bytes, in sorted order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _inner(optimizer: Any) -> Any:
    """The optimizer itself, beneath Accelerate's wrapper (which steps through the loss scaler)."""
    return getattr(optimizer, "optimizer", optimizer)


def split_tensors(value: Any, path: str = "") -> tuple[Any, dict[str, Any]]:
    """``value`` with each tensor replaced by :data:`IN_SHARDS`, and those tensors by path.

    A path is the keys down to the tensor: ``/state/0/exp_avg``.

    The optimizer's plain part (param groups, counters) goes in the ``.pth``,
    where it is checked like every checkpoint key; only tensors go to DCP, so
    nothing but tensors is read back from the shard folder.
    """
    import torch

    if isinstance(value, torch.Tensor):
        return IN_SHARDS, {path: value}
    tensors: dict[str, Any] = {}
    if isinstance(value, dict):
        plain = {}
        for key, item in value.items():
            plain[key], found = split_tensors(item, f"{path}/{key}")
            tensors.update(found)
        return plain, tensors
    if isinstance(value, (list, tuple)):
        items = []
        for index, item in enumerate(value):
            plain_item, found = split_tensors(item, f"{path}/{index}")
            items.append(plain_item)
            tensors.update(found)
        return type(value)(items), tensors
    return value, tensors


def marked_paths(plain: Any, path: str = "") -> list[str]:
    """The paths where :func:`split_tensors` took a tensor out of ``plain``."""
    if plain == IN_SHARDS:
        return [path]
    if isinstance(plain, dict):
        return [p for key, item in plain.items() for p in marked_paths(item, f"{path}/{key}")]
    if isinstance(plain, (list, tuple)):
        return [p for i, item in enumerate(plain) for p in marked_paths(item, f"{path}/{i}")]
    return []


def join_tensors(plain: Any, tensors: dict[str, Any], path: str = "") -> Any:
    """:func:`split_tensors` undone: each tensor put back where its path says."""
    if path in tensors:
        return tensors[path]
    if isinstance(plain, dict):
        return {key: join_tensors(item, tensors, f"{path}/{key}") for key, item in plain.items()}
    if isinstance(plain, (list, tuple)):
        return type(plain)(
            join_tensors(item, tensors, f"{path}/{index}") for index, item in enumerate(plain)
        )
    return plain


def save_optimizer_shards(
    state: dict[str, Any], path: Path, step: int, accelerator: Any
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Write the tensors of the optimizer's ``state`` (its ``state_dict``) for checkpoint ``path``.

    Every process must call it.

    :returns: the optimizer's plain part (its ``state_dict`` without tensors,
        for the ``.pth``) and, on the main process, the ``shards`` entry the
        ``.pth`` carries (``folder``, ``checksum``, ``processes``); None on the others.
    """
    import torch.distributed.checkpoint as dcp

    plain, tensors = split_tensors(state)
    folder = shard_folder(path, step)
    temporary = folder.with_name(folder.name + TMP)
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)  # a killed save's leftovers
    accelerator.wait_for_everyone()
    # Each process writes its own rows; DCP's last collective returns once the
    # main process wrote the metadata, so the folder is whole when save returns.
    dcp.save(tensors, checkpoint_id=temporary)
    if not accelerator.is_main_process:
        return plain, None
    if folder.exists():  # the same file saved twice at one step: the same state
        shutil.rmtree(folder)
    temporary.rename(folder)
    entry = {
        "folder": folder.name,
        "checksum": folder_checksum(folder),
        "processes": accelerator.num_processes,
    }
    return plain, entry


def _initialise_state(optimizer: Any) -> None:
    """Give every parameter its optimizer state, unchanged weights, so DCP has tensors to fill.

    A zero gradient and a learning rate of 0 for one step: Adam's and Muon's
    updates and their weight decays (``1 - lr * wd``) then leave every weight
    exactly as it was, and what the step put in the state is overwritten by
    the load. (torch's ``get_optimizer_state_dict`` does the same.)
    """
    import torch

    inner = _inner(optimizer)
    rates = [group["lr"] for group in inner.param_groups]
    params = [p for group in inner.param_groups for p in group["params"] if p.requires_grad]
    for group in inner.param_groups:
        group["lr"] = 0.0
    for param in params:
        param.grad = torch.zeros_like(param)
    inner.step()
    inner.zero_grad(set_to_none=True)
    for group, rate in zip(inner.param_groups, rates, strict=True):
        group["lr"] = rate


def load_optimizer_shards(
    optimizer: Any, checkpoint_path: Path, entry: Any, plain: dict[str, Any]
) -> dict[str, Any]:
    """The optimizer state the checkpoint at ``checkpoint_path`` names, resharded for this run.

    Every process must call it. The folder is checked against the checksum
    the ``.pth`` carries before anything is read from it (DCP's metadata file
    is a pickle: the checksum ties it to the ``.pth``, which is loaded safely).

    :param plain: the ``.pth``'s ``optimizer``: the state without its tensors.
    :returns: a ``state_dict`` for ``optimizer.load_state_dict``.
    :raises CheckpointError: the folder is missing, does not match, or holds
        another optimizer's state.
    """
    import torch.distributed.checkpoint as dcp

    if not isinstance(entry, dict) or not isinstance(entry.get("folder"), str):
        raise CheckpointError(f"{checkpoint_path}: shards: expected a table naming a folder")
    folder = checkpoint_path.parent / entry["folder"]
    if not folder.is_dir():
        raise CheckpointError(
            f"{checkpoint_path}: its optimizer shards {folder} are missing; restore the folder "
            "or start over with --fresh"
        )
    if folder_checksum(folder) != entry.get("checksum"):
        raise CheckpointError(
            f"{checkpoint_path}: damaged: the optimizer shards in {folder} do not match the "
            "checksum written with it (a partial copy?); start over with --fresh"
        )
    _initialise_state(optimizer)
    # This run's own tensors (its shards' shapes and placements), filled in place.
    _, tensors = split_tensors(_inner(optimizer).state_dict())
    saved = set(marked_paths(plain))
    if saved != set(tensors):
        raise CheckpointError(
            f"{checkpoint_path}: its optimizer state does not fit this run's optimizer "
            f"({len(saved)} tensors there, {len(tensors)} here)"
        )
    dcp.load(tensors, checkpoint_id=folder)
    return join_tensors(plain, tensors)


def sweep_shard_folders(folder: Path, written: dict[str, str]) -> None:
    """Remove shard folders no checkpoint file needs (main process, after its writes).

    :param written: file name -> its shard folder's name, for the files just
        written: their older folders go. A folder whose file is gone (the
        ``checkpoint`` plugin pruned it) goes too, and so does a ``.tmp`` one
        a killed save left.
    """
    for entry in folder.glob(f"*{SHARDS}*"):
        owner = entry.name.split(SHARDS)[0]
        stale = (
            entry.name.endswith(TMP)
            or not (folder / owner).exists()
            or (owner in written and written[owner] != entry.name)
        )
        if stale and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
