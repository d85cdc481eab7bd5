"""The memory-mapped sampler: windows, per-rank streams, exact resume, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanogpt_core.data.token_windows import MemmapSampler
from nanogpt_core.errors import NanoGPTError


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(10_000, dtype=np.uint16).tofile(path)
    return path


def test_batches_are_windows_with_targets_shifted_by_one(token_file):
    sampler = MemmapSampler(token_file, "uint16", block_size=16, batch_size=4, seed=0)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y, strict=True):
        start = int(row_x[0])
        assert torch.equal(row_x, torch.arange(start, start + 16))
        assert torch.equal(row_y, torch.arange(start + 1, start + 17))


def test_uint32_files_read_with_their_dtype(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(70_000, 71_000, dtype=np.uint32).tofile(path)
    x, _ = MemmapSampler(
        path, "uint32", block_size=8, batch_size=2, seed=0, vocab_size=80_000
    ).next_batch()
    assert int(x.min()) >= 70_000


def test_each_seed_is_its_own_stream(token_file):
    rank0 = MemmapSampler(token_file, "uint16", 16, 8, seed=1337)
    rank1 = MemmapSampler(token_file, "uint16", 16, 8, seed=1338)
    again = MemmapSampler(token_file, "uint16", 16, 8, seed=1337)
    a, b, c = rank0.next_batch()[0], rank1.next_batch()[0], again.next_batch()[0]
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


def test_saved_state_continues_with_the_same_batches(token_file):
    sampler = MemmapSampler(token_file, "uint16", 16, 4, seed=7)
    for _ in range(3):
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch()[0] for _ in range(3)]
    resumed = MemmapSampler(token_file, "uint16", 16, 4, seed=999)
    resumed.load_state_dict(state)
    assert all(torch.equal(e, resumed.next_batch()[0]) for e in expected)


def test_shortest_usable_file_has_one_window(tmp_path):
    path = tmp_path / "val.bin"
    np.arange(17, dtype=np.uint16).tofile(path)
    x, y = MemmapSampler(path, "uint16", 16, 2, seed=0).next_batch()
    assert torch.equal(x[0], torch.arange(16)) and torch.equal(y[1], torch.arange(1, 17))


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        (
            np.arange(16, dtype=np.uint16).tobytes(),
            {},
            "cannot hold one window of block_size \\+ 1 = 17",
        ),
        (
            np.arange(100, dtype=np.uint16).tobytes() + b"x",
            {},
            "not a whole number of uint16 tokens",
        ),
        (
            np.full(100, 70, dtype=np.uint16).tobytes(),
            {"vocab_size": 65},
            "token id 70 is outside the vocabulary of 65",
        ),
    ],
)
def test_unusable_files_are_refused(tmp_path, content, kwargs, message):
    path = tmp_path / "train.bin"
    path.write_bytes(content)
    with pytest.raises(NanoGPTError, match=message):
        MemmapSampler(path, "uint16", 16, 2, seed=0, **kwargs)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(NanoGPTError, match="file not found"):
        MemmapSampler(tmp_path / "nope.bin", "uint16", 16, 2, seed=0)


class CountingMemmap(np.memmap):
    """``np.memmap`` that counts the tokens each indexing hands out (what gets read)."""

    tokens_read = 0

    def __getitem__(self, key):
        out = super().__getitem__(key)
        CountingMemmap.tokens_read += int(np.size(out))
        return out


def test_an_evaluation_reads_its_windows_not_the_whole_file(tmp_path, monkeypatch, tiny_trainer):
    """Token ids are checked once, when training starts; an evaluation reads only its batches."""
    monkeypatch.setattr(np, "memmap", CountingMemmap)
    read = {}
    for tokens in (100_000, 4_000_000):
        CountingMemmap.tokens_read = 0
        trainer = tiny_trainer(tmp_path / str(tokens), tokens)
        at_start = CountingMemmap.tokens_read
        assert at_start >= 2 * tokens  # the start-of-run check read train.bin and val.bin
        CountingMemmap.tokens_read = 0
        trainer.estimate_loss()
        read[tokens] = CountingMemmap.tokens_read
    # Two splits x two batches x four windows of block_size + 1 tokens, whatever the
    # file size (np.stack indexes each window's view once more: twice the tokens).
    windows = 2 * 2 * 4 * 17
    assert read[100_000] == read[4_000_000] <= 2 * windows
