"""Random training windows from a memory-mapped token file.

The trainer only knows the :class:`BatchSource` interface: "give me the next
(inputs, targets) pair" plus a saveable state. :class:`MemmapSampler` is the
pre-training implementation: each batch is ``batch_size`` windows of
``block_size + 1`` tokens at random offsets of ``train.bin`` or ``val.bin``, so an
"epoch" is simply a fixed number of steps, however large the corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from nanogpt_core.errors import NanoGPTError

# Tokens scanned at a time when checking ids against the vocabulary (32 MiB of uint16).
SCAN_CHUNK = 1 << 24


class BatchSource(Protocol):
    """A stream of training batches.

    ``next_batch`` returns ``(inputs, targets)``, both int64 tensors of shape
    (batch_size, block_size) on the CPU; a target of -1 takes no loss, so sources
    of padded or prompt-masked examples fit the same trainer.
    """

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of inputs and targets."""

    def state_dict(self) -> dict[str, Any]:
        """The state that decides the following batches (saved in checkpoints)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where :meth:`state_dict` left off."""


def check_token_range(path: Path, dtype: np.dtype | str, vocab_size: int) -> None:
    """Refuse a token file holding an id outside the vocabulary.

    This reads the whole file (tens of gigabytes for FineWeb-Edu), so it runs
    once per run, when training starts, never per evaluation.
    """
    data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    for start in range(0, len(data), SCAN_CHUNK):
        highest = int(data[start : start + SCAN_CHUNK].max())
        if highest >= vocab_size:
            raise NanoGPTError(
                f"{path}: token id {highest} is outside the vocabulary of {vocab_size}; "
                "the data was prepared with another tokenizer"
            )
    del data


class MemmapSampler:
    """Random windows of a token file, read through ``np.memmap``.

    :param path: a ``train.bin`` or ``val.bin`` file.
    :param dtype: its token dtype (``uint16`` or ``uint32``, from ``meta.json``).
    :param seed: seeds this sampler's own generator; give each process its own
        (seed + rank) so ranks draw different batches.
    :param vocab_size: when given, a file holding a larger id is refused (a
        scan of the whole file: give it once per run, not per evaluation).
    """

    def __init__(
        self,
        path: Path,
        dtype: np.dtype | str,
        block_size: int,
        batch_size: int,
        seed: int,
        vocab_size: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.num_tokens = self._check(vocab_size)

    def _check(self, vocab_size: int | None) -> int:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise NanoGPTError(f"{self.path}: file not found; run `gpt prepare` first") from None
        if size % self.dtype.itemsize:
            raise NanoGPTError(
                f"{self.path}: {size} bytes is not a whole number of {self.dtype.name} tokens "
                "(a truncated or foreign file); prepare the data again"
            )
        num_tokens = size // self.dtype.itemsize
        if num_tokens < self.block_size + 1:
            raise NanoGPTError(
                f"{self.path}: {num_tokens} tokens cannot hold one window of block_size + 1 = "
                f"{self.block_size + 1}; use more data or a smaller model.block_size"
            )
        if vocab_size is not None:
            check_token_range(self.path, self.dtype, vocab_size)
        return num_tokens

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: inputs and the same tokens shifted by one."""
        # A fresh memmap per batch, as nanoGPT does: a long-lived one lets the
        # process's resident memory grow with every page it has ever touched.
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        starts = torch.randint(
            self.num_tokens - self.block_size, (self.batch_size,), generator=self.generator
        ).tolist()
        windows = np.stack([data[i : i + self.block_size + 1] for i in starts]).astype(np.int64)
        del data
        batch = torch.from_numpy(windows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        """The generator state: the next batches follow from it exactly."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator so the same batches come next."""
        self.generator.set_state(state["generator"])
