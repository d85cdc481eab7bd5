"""Batches of whole examples for instruction tuning.

Pre-training draws random windows (``sampler.py``); fine-tuning trains on
*examples* (a prompt, a response, an end-of-text token), and the loss is on the
response only. :class:`ExampleBatches` implements the same :class:`BatchSource`
contract for prepared example data:

- a batch holds whole examples, right-padded to the longest one in it (not to
  ``block_size``); targets are -1 on the prompt and on padding, so the model's
  ``ignore_index=-1`` cross-entropy is the mean over response tokens;
- an epoch is one pass over the examples in a seeded shuffled order, the same on
  every process; each global batch of ``batch_size * processes`` examples is cut
  into one slice per process, so processes see disjoint examples;
- nearby lengths are grouped (sorted within shuffled windows of many batches,
  then the batches themselves shuffled) to cut padding, as Hugging Face's
  ``group_by_length`` does;
- the state is (epoch, position): a resumed run continues mid-epoch exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Sort lengths within windows of this many global batches: long enough to group
# similar lengths, short enough that batch composition stays random.
GROUP_WINDOW = 50
START, LENGTH, RESPONSE = 0, 1, 2


class ExampleBatches:
    """Padded batches of whole examples, one pass per epoch, split across processes.

    :param tokens: the split's ``.bin`` file of concatenated example tokens.
    :param dtype: its token dtype.
    :param examples: the split's ``(N, 3)`` rows of ``start, length, response_start``.
    :param batch_size: examples per process per batch.
    :param seed: the shuffle's seed; the same on every process.
    :param rank: this process's index; ``world`` the number of processes.
    :param pad_id: the input id of padding positions (their targets are -1).
    :param group_by_length: group nearby lengths to cut padding.
    """

    def __init__(
        self,
        tokens: Path,
        dtype: np.dtype | str,
        examples: np.ndarray,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        pad_id: int = 0,
        group_by_length: bool = True,
    ) -> None:
        self.tokens = Path(tokens)
        self.dtype = np.dtype(dtype)
        self.examples = np.asarray(examples, dtype=np.int64)
        if len(self.examples) == 0:
            raise ValueError(f"{self.tokens}: no examples")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.pad_id = pad_id
        self.group_by_length = group_by_length
        self.global_batch = batch_size * world
        self.batches_per_epoch = math.ceil(len(self.examples) / self.global_batch)
        self.epoch = 0
        self.position = 0
        self._order: list[np.ndarray] | None = None
        self.counts = {"tokens": 0, "padding": 0, "response": 0}
        self.global_tokens = 0

    # -- the epoch's order -------------------------------------------------

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Every global batch of ``epoch``, as arrays of example indices."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.examples))
        if self.group_by_length:
            window = self.global_batch * GROUP_WINDOW
            lengths = self.examples[:, LENGTH]
            for begin in range(0, len(order), window):
                chunk = order[begin : begin + window]
                order[begin : begin + window] = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches = [
            order[i : i + self.global_batch] for i in range(0, len(order), self.global_batch)
        ]
        if self.group_by_length:
            # Shuffle whole batches, so long ones do not all come first in a window.
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _share(self, global_batch: np.ndarray, rank: int | None = None) -> np.ndarray:
        """A process's slice of a global batch (disjoint from the others'); ours by default."""
        rank = self.rank if rank is None else rank
        if len(global_batch) == self.global_batch:
            return global_batch[rank * self.batch_size : (rank + 1) * self.batch_size]
        # The epoch's last, partial batch: deal it out in turn. A process left with
        # nothing repeats one example so that every process takes the same steps.
        share = global_batch[rank :: self.world]
        return share if len(share) else global_batch[:1]

    def _real_tokens(self, global_batch: np.ndarray) -> int:
        """Input tokens (not padding) of a global batch over all processes' shares."""
        shares = [self._share(global_batch, rank) for rank in range(self.world)]
        lengths = self.examples[np.concatenate(shares), LENGTH]
        return int(lengths.sum() - len(lengths))

    # -- BatchSource -------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of this process: inputs and targets, both (B, longest - 1)."""
        if self._order is None:
            self._order = self.epoch_batches(self.epoch)
        global_batch = self._order[self.position]
        indices = self._share(global_batch)
        self.global_tokens += self._real_tokens(global_batch)
        self.position += 1
        if self.position == len(self._order):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return self.collate(indices)

    def collate(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad the chosen examples into inputs and prompt-masked targets."""
        data = np.memmap(self.tokens, dtype=self.dtype, mode="r")
        rows = self.examples[indices]
        width = int(rows[:, LENGTH].max()) - 1
        x = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        y = np.full((len(rows), width), -1, dtype=np.int64)
        for i, (start, length, response) in enumerate(rows):
            ids = data[start : start + length].astype(np.int64)
            x[i, : length - 1] = ids[:-1]
            # Target t is token t + 1: the response starts being predicted at response - 1.
            y[i, response - 1 : length - 1] = ids[response:]
        del data
        self.counts["tokens"] += int(rows[:, LENGTH].sum() - len(rows))
        self.counts["padding"] += int(x.size - (rows[:, LENGTH].sum() - len(rows)))
        self.counts["response"] += int((y != -1).sum())
        return torch.from_numpy(x), torch.from_numpy(y)

    def take_counts(self) -> dict[str, int]:
        """Tokens, padding and response tokens batched since the last call."""
        counts, self.counts = self.counts, {"tokens": 0, "padding": 0, "response": 0}
        return counts

    def take_global_tokens(self) -> int:
        """Real tokens of every process's batches since the last call (the same on all)."""
        tokens, self.global_tokens = self.global_tokens, 0
        return tokens

    def state_dict(self) -> dict[str, Any]:
        """Where in which epoch: the following batches follow from it exactly."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved epoch and position."""
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
