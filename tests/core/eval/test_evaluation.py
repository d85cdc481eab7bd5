"""The Evaluator: continuation scores, truncation, batching, and its one-line refusals."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from nanogpt_core.eval.evaluator import EvalInputError, Evaluator
from nanogpt_core.model.gpt import GPT, GPTConfig


class Ids:
    """A stand-in tokenizer: only start_ids is asked for."""

    def start_ids(self) -> list[int]:
        return [0]


def evaluator(batch_size: int = 4, block_size: int = 16) -> Evaluator:
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=block_size, vocab_size=50, n_layer=2, n_head=2, n_embd=16, bias=True)
    )
    return Evaluator(
        model=model, tokenizer=Ids(), accelerator=Accelerator(cpu=True), batch_size=batch_size
    )


def direct(model: GPT, context: list[int], tail: list[int]) -> tuple[float, bool]:
    """The log-probability of ``tail`` after ``context`` from one unpadded forward pass."""
    ids = torch.tensor([(context + tail)[-(model.config.block_size + 1) :]])
    with torch.no_grad():
        logits = model.head_logits(model.hidden(ids[:, :-1]))
    logits = logits[0, -len(tail) :]
    logprob = -F.cross_entropy(logits, torch.tensor(tail), reduction="sum").item()
    return logprob, bool((logits.argmax(-1) == torch.tensor(tail)).all())


def test_scores_equal_one_forward_pass_per_request_whatever_the_batching():
    ev = evaluator(batch_size=3)
    examples = [
        [([1, 2, 3], [4, 5]), ([1, 2, 3], [6])],
        [(list(range(1, 30)), [7, 8, 9])],  # longer than block_size: the context is cut
        [([], [10, 11])],  # no context: the tokenizer's start ids
        [([3], [4]), ([5, 6, 7, 8], [9, 10, 11, 12])],
    ]
    scores = ev.loglikelihood(examples)
    assert [len(s) for s in scores] == [2, 1, 1, 2]
    for example, scored in zip(examples, scores, strict=True):
        for (context, tail), result in zip(example, scored, strict=True):
            logprob, greedy = direct(ev.model, context or [0], tail)
            assert result.logprob == pytest.approx(logprob, abs=1e-4)
            assert result.greedy == greedy
            assert result.tokens == len(tail)
            assert result.mean_loss == pytest.approx(-logprob / len(tail), abs=1e-4)
    assert scores[1][0].truncated == 29 + 3 - 17
    assert all(s.truncated == 0 for i, ex in enumerate(scores) if i != 1 for s in ex)
    one_by_one = evaluator(batch_size=1).loglikelihood(examples)
    assert [[round(s.logprob, 4) for s in ex] for ex in one_by_one] == [
        [round(s.logprob, 4) for s in ex] for ex in scores
    ]
    assert ev.model.training  # the model's mode is restored


def test_greedy_continuations_are_flagged():
    ev = evaluator()
    context = [1, 2, 3]
    ids = torch.tensor([context])
    tail = []
    with torch.no_grad():
        for _ in range(3):
            logits, _ = ev.model(torch.tensor([context + tail]))
            tail.append(int(logits[0, -1].argmax()))
    ((best, other),) = ev.loglikelihood(
        [[(context, tail), (context, [(tail[0] + 1) % 50, *tail[1:]])]]
    )
    assert best.greedy and not other.greedy
    assert best.logprob > other.logprob
    del ids


def test_unscorable_requests_are_one_line():
    ev = evaluator(block_size=8)
    with pytest.raises(
        EvalInputError, match=r"^example 2: a continuation of 9 tokens does not fit"
    ):
        ev.loglikelihood([[([1], [2])], [([1], list(range(9)))]])
    with pytest.raises(EvalInputError, match="empty continuation"):
        ev.loglikelihood([[([1], [])]])


def test_split_loss_needs_an_experiment():
    from nanogpt_core.errors import NanoGPTError

    with pytest.raises(NanoGPTError, match="pass --experiment"):
        evaluator().split_loss("val")


def test_scoring_reads_the_device_once_per_batch_whatever_the_rows(count_host_reads):
    import random

    rng = random.Random(0)
    ev = evaluator(batch_size=4, block_size=16)

    def examples(count: int) -> list:
        """``count`` examples of three continuations (1 to 3 tokens) after random contexts."""
        return [
            [
                ([rng.randrange(50) for _ in range(rng.randrange(20))], [1, 2, 3][:e])
                for e in (1, 2, 3)
            ]
            for _ in range(count)
        ]

    scored: list = []
    few = count_host_reads(lambda: scored.append(ev.loglikelihood(examples(8))))
    many = count_host_reads(lambda: scored.append(ev.loglikelihood(examples(40))))
    # One tolist() per batch of 4 examples (12 continuations): 2 and 10 batches,
    # not one read per continuation (24 and 120) or per token.
    assert (few, many) == (2, 10)
    assert [len(s) for s in scored] == [8, 40] and all(len(e) == 3 for e in scored[1])
    # The counter sees reads: the same scores read one at a time count every one.
    assert count_host_reads(lambda: [float(torch.tensor(c.logprob)) for c in scored[0][0]]) == 3
