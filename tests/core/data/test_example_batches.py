"""Batches of whole examples: masking, padding, epochs, processes, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from nanogpt_core.data.example_batches import ExampleBatches
from nanogpt_core.model.gpt import GPT, GPTConfig


def write_examples(folder: Path, lengths: list[int], seed: int = 0) -> tuple[Path, np.ndarray]:
    """A .bin of random examples and their (start, length, response_start) rows."""
    rng = np.random.default_rng(seed)
    rows, tokens, start = [], [], 0
    for length in lengths:
        response = int(rng.integers(1, length - 1))  # at least one prompt and one response token
        tokens.extend(rng.integers(1, 60, size=length).tolist())
        rows.append((start, length, response))
        start += length
    path = folder / "train.bin"
    np.asarray(tokens, dtype=np.uint16).tofile(path)
    return path, np.asarray(rows, dtype=np.int64)


def test_targets_are_the_response_only_and_inputs_are_right_padded(tmp_path):
    path, rows = write_examples(tmp_path, [5, 9, 7])
    batches = ExampleBatches(path, "uint16", rows, 3, seed=0, pad_id=63, group_by_length=False)
    x, y = batches.collate(np.array([0, 1, 2]))
    data = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    assert x.shape == y.shape == (3, 8)  # the longest example (9) minus one
    for i, (start, length, response) in enumerate(rows):
        ids = data[start : start + length]
        assert x[i, : length - 1].tolist() == ids[:-1].tolist()
        assert (x[i, length - 1 :] == 63).all()
        assert (y[i, : response - 1] == -1).all()  # the prompt predicts nothing
        assert y[i, response - 1 : length - 1].tolist() == ids[response:].tolist()
        assert (y[i, length - 1 :] == -1).all()  # nor does padding


def test_the_loss_is_the_mean_over_response_tokens(tmp_path):
    path, rows = write_examples(tmp_path, [6, 11, 8, 10])
    batches = ExampleBatches(path, "uint16", rows, 4, seed=0, group_by_length=False)
    x, y = batches.collate(np.arange(4))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=1, n_embd=16, bias=True))
    _, loss = model(x, y)
    logits = model.head_logits(model.hidden(x))
    # By hand: cross-entropy at each response position, averaged over all of them.
    data = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    by_hand = []
    for i, (start, length, response) in enumerate(rows):
        ids = torch.from_numpy(data[start : start + length])
        for t in range(response - 1, length - 1):
            by_hand.append(F.cross_entropy(logits[i, t], ids[t + 1]))
    assert loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-6)
    # What the prompt positions would have predicted plays no part.
    scrambled = y.clone()
    scrambled[y == -1] = torch.randint(0, 64, ((y == -1).sum().item(),))
    prompt_only = (y == -1) & (x != 0)
    _, unmasked_loss = model(x, scrambled)
    assert prompt_only.any() and unmasked_loss.item() != loss.item()
    _, again = model(x, torch.where(y == -1, torch.full_like(y, -1), scrambled))
    assert again.item() == loss.item()


@pytest.mark.parametrize("count", [24, 23, 17])
def test_an_epoch_is_one_pass_split_across_processes_without_overlap(tmp_path, count):
    path, rows = write_examples(tmp_path, [4 + i % 7 for i in range(count)])
    ranks = [ExampleBatches(path, "uint16", rows, 3, seed=5, rank=r, world=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == -(-count // 6)
    seen: list[list[int]] = [[], []]
    for rank, batches in enumerate(ranks):
        for global_batch in batches.epoch_batches(0):
            seen[rank].extend(batches._share(global_batch).tolist())
    if count % 6 == 0 or count % 6 >= 2:
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(count))
    # Same seed, same order; another epoch, another order.
    assert [b.tolist() for b in ranks[0].epoch_batches(0)] == [
        b.tolist() for b in ranks[1].epoch_batches(0)
    ]
    assert [b.tolist() for b in ranks[0].epoch_batches(1)] != [
        b.tolist() for b in ranks[0].epoch_batches(0)
    ]


def test_grouping_by_length_cuts_padding(tmp_path):
    lengths = np.random.default_rng(1).integers(5, 120, size=400).tolist()
    path, rows = write_examples(tmp_path, lengths)
    shares = {}
    for grouped in (False, True):
        batches = ExampleBatches(path, "uint16", rows, 8, seed=0, group_by_length=grouped)
        for _ in range(batches.batches_per_epoch):
            batches.next_batch()
        counts = batches.take_counts()
        shares[grouped] = counts["padding"] / (counts["padding"] + counts["tokens"])
    assert shares[True] < shares[False] / 3


def test_resume_mid_epoch_gives_the_same_batches(tmp_path):
    path, rows = write_examples(tmp_path, [4 + i % 9 for i in range(30)])
    straight = ExampleBatches(path, "uint16", rows, 4, seed=3)
    expected = [straight.next_batch() for _ in range(20)]  # crosses into epoch 2
    first = ExampleBatches(path, "uint16", rows, 4, seed=3)
    for _ in range(5):
        first.next_batch()
    resumed = ExampleBatches(path, "uint16", rows, 4, seed=3)
    resumed.load_state_dict(first.state_dict())
    for x, y in expected[5:]:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    assert resumed.state_dict()["epoch"] == 2
