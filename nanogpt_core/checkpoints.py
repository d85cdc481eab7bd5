"""Checkpoint files: saved atomically, loaded without running pickled code.

A checkpoint is the dict the trainer's ``snapshot()`` returns: tensors and plain
containers only, so :func:`load_checkpoint` can insist on
``torch.load(weights_only=True)``. A file that would need pickled code to load
is refused, never executed.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from nanogpt_core.errors import NanoGPTError
from nanogpt_core.files import atomic_write

REQUIRED_KEYS = ("model", "model_args", "step", "tokenizer")


class CheckpointError(NanoGPTError):
    """A checkpoint that cannot or must not be loaded."""


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` to ``path`` through a temporary file and a rename."""
    import torch

    atomic_write(Path(path), lambda handle: torch.save(checkpoint, handle))


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint, refusing missing, corrupt, foreign and unsafe files in one line."""
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a .pth checkpoint file")
    # torch.save writes a zip archive; anything else is damaged or not ours.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt: not a torch zip archive)"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = [line.strip() for line in str(exc).splitlines() if line.strip()]
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
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {first})"
        ) from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_KEYS):
        raise CheckpointError(
            f"{path}: not a nanogpt checkpoint (expected keys {', '.join(REQUIRED_KEYS)})"
        )
    return checkpoint
