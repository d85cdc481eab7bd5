"""What an evaluation task is handed: the model and the two ways the core scores it.

An eval task (registered with ``register_eval_tasks``) never runs the model
itself. It asks the :class:`Evaluator`:

- :meth:`Evaluator.loglikelihood`: how likely is each continuation after its
  context (the primitive of lm-evaluation-harness and of llm.c's HellaSwag)?
  The evaluator cuts contexts that do not fit, pads a batch of examples into
  one forward pass, and splits the batches between processes;
- :meth:`Evaluator.split_loss`: the loss on a prepared split of the
  experiment's data, over the same fixed batches the trainer evaluates.

:meth:`Evaluator.from_main_process` runs a loader (a hub download) on the main
process only and hands every process its result, or the same one-line error.

Work is split by whole batches (batch ``k`` goes to process ``k % world``) and
the batches are cut the same way whatever the number of processes, so a run
under ``accelerate launch`` gives exactly the numbers of one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from nanogpt_core.errors import NanoGPTError

if TYPE_CHECKING:
    import torch

    from nanogpt_core.config.experiment import ExperimentConfig
    from nanogpt_core.data.prepared import PreparedData
    from nanogpt_core.data.tokenizers import Tokenizer

# Evaluation draws fixed batches that never touch the training stream: the
# trainer's seed offset, so `gpt eval --task val_loss` sees the trainer's batches.
EVAL_SEED_OFFSET = 1_000_003

Request = tuple[Sequence[int], Sequence[int]]
"""One thing to score: ``(context_ids, continuation_ids)``; an example is a list of them."""
T = TypeVar("T")


@attrs.frozen
class Continuation:
    """How a model scored one continuation after its context.

    :ivar logprob: sum of the log-probabilities of the continuation's tokens.
    :ivar tokens: how many tokens the continuation has.
    :ivar greedy: whether each continuation token is the model's most likely one.
    :ivar truncated: context tokens dropped from the front to fit ``block_size``.
    """

    logprob: float
    tokens: int
    greedy: bool
    truncated: int = 0

    @property
    def loss(self) -> float:
        """Summed cross-entropy of the continuation (``-logprob``)."""
        return -self.logprob

    @property
    def mean_loss(self) -> float:
        """Cross-entropy per continuation token."""
        return -self.logprob / self.tokens


@attrs.frozen
class EvalResult:
    """What a task's ``evaluate`` returns.

    :ivar metrics: metric name to value, e.g. ``{"acc": 0.29, "acc_norm": 0.31}``.
    :ivar n: how many examples (or sequences) were scored.
    :ivar notes: lines worth telling the user (contexts that were cut, say).
    """

    metrics: dict[str, float]
    n: int
    notes: tuple[str, ...] = ()


@attrs.frozen
class SplitLoss:
    """What :meth:`Evaluator.split_loss` measured: the mean loss and over how many sequences."""

    loss: float
    sequences: int


class EvalInputError(NanoGPTError):
    """A request the model cannot score: an empty continuation, or one longer than ``block_size``.

    ``EvalInputError(message)``; :meth:`Evaluator.loglikelihood` raises it with the
    example's number. A task may catch it to skip such examples; uncaught, it is
    one line and exit status 2, like any :class:`NanoGPTError`.
    """


@attrs.define
class Evaluator:
    """The model under evaluation, and the core's scoring of it (see the module doc).

    Every process must make the same calls in the same order: each call
    communicates.

    :ivar model: the unwrapped GPT, in eval mode during :meth:`scoring`.
    :ivar tokenizer: the model's tokenizer.
    :ivar accelerator: the ``accelerate.Accelerator`` (device, autocast, processes).
    :ivar batch_size: examples per forward pass (all requests of an example go together).
    :ivar limit: score at most this many examples (tasks apply it); None for all.
    :ivar experiment: the experiment, when one was given (``val_loss`` needs it).
    :ivar data: its prepared data, when an experiment was given.
    """

    model: Any
    tokenizer: Tokenizer
    accelerator: Any
    batch_size: int = 8
    limit: int | None = None
    experiment: ExperimentConfig | None = None
    data: PreparedData | None = None

    @property
    def block_size(self) -> int:
        """The model's context length."""
        return int(self.model.config.block_size)

    @property
    def is_main_process(self) -> bool:
        """Whether this process prints and writes files."""
        return bool(self.accelerator.is_main_process)

    @property
    def num_processes(self) -> int:
        """How many processes share the work."""
        return int(self.accelerator.num_processes)

    @contextlib.contextmanager
    def scoring(self) -> Iterator[None]:
        """Eval mode and no gradients inside; the model's mode is restored after."""
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def from_main_process(self, load: Callable[[], T]) -> T:
        """``load()`` run on the main process only; every process gets its result or its error.

        For what one process should fetch for all (a data set from the hub): the
        others never call ``load`` and receive its (pickled) result. Whether it
        worked is known everywhere before anyone waits in another collective, so
        a failed download stops every process with the same one-line error
        instead of leaving the others waiting for the one that failed.
        """
        from nanogpt_core.main_process import on_main_process

        return on_main_process(self.accelerator, load, others="share")

    # -- continuations -------------------------------------------------------

    def loglikelihood(self, examples: Sequence[Sequence[Request]]) -> list[list[Continuation]]:
        """Score every continuation of every example; same shape as ``examples``.

        A context longer than fits keeps its last tokens (``truncated`` says how
        many went); a continuation is never cut. An empty context starts from the
        tokenizer's start ids. The requests of ``batch_size`` consecutive examples
        go through the model as one padded batch.

        :raises EvalInputError: a continuation is empty or longer than ``block_size``.
        """
        rows = []
        for number, example in enumerate(examples, start=1):
            try:
                rows.append([self._row(context, tail) for context, tail in example])
            except EvalInputError as exc:
                raise EvalInputError(f"example {number}: {exc}") from None
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        scored = self._map_batches(batches, self._score_batch)
        return [example for batch in scored for example in batch]

    def _row(
        self, context: Sequence[int], continuation: Sequence[int]
    ) -> tuple[list[int], int, int]:
        """(input + target ids, continuation length, context tokens dropped) for one request."""
        context, continuation = list(context), list(continuation)
        if not continuation:
            raise EvalInputError("an eval task asked to score an empty continuation")
        if len(continuation) > self.block_size:
            raise EvalInputError(
                f"a continuation of {len(continuation)} tokens does not fit the model's "
                f"block_size of {self.block_size}; it cannot be scored"
            )
        if not context:
            context = list(self.tokenizer.start_ids())
        # The model reads block_size tokens and predicts the one after each.
        dropped = max(0, len(context) + len(continuation) - (self.block_size + 1))
        return context[dropped:] + continuation, len(continuation), dropped

    def _score_batch(
        self, batch: list[list[tuple[list[int], int, int]]]
    ) -> list[list[Continuation]]:
        """One padded forward pass for a batch of examples' requests, read back once.

        Each request's summed loss and greedy flag are reduced on the device and
        copied to the host in one ``tolist()`` per batch: a read per request
        would make the host wait on the device tens of thousands of times over
        HellaSwag's 10,042 rows.
        """
        import torch
        from torch.nn import functional as F

        flat = [row for example in batch for row in example]
        length = max(len(ids) for ids, _, _ in flat) - 1
        widest = max(n for _, n, _ in flat)
        x = torch.zeros((len(flat), length), dtype=torch.long)
        # Where the continuation tokens are is known here, on the host: their
        # positions in the (rows * length) hidden states and their cells in a
        # (rows * widest) grid of per-token losses. A boolean mask would make the
        # device report how many positions it selected (a wait, on a GPU).
        positions: list[int] = []
        cells: list[int] = []
        targets: list[int] = []
        for i, (ids, n, _) in enumerate(flat):
            x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
            first = i * length + len(ids) - 1 - n
            positions.extend(range(first, first + n))
            cells.extend(range(i * widest, i * widest + n))
            targets.extend(ids[-n:])
        device = self.accelerator.device
        x = x.to(device)
        at, cell, target = torch.tensor([positions, cells, targets], device=device)
        with self.accelerator.autocast():
            # Logits of the continuations' positions only: the output layer over
            # a 50k vocabulary costs as much as the blocks of a small model.
            hidden = self.model.hidden(x).flatten(0, 1)  # (rows * length, C)
            logits = self.model.head_logits(hidden[at]).float()  # (N, V)
        losses = F.cross_entropy(logits, target, reduction="none")
        misses = (logits.argmax(dim=-1) != target).float()
        # Row sums on the device: the padding cells hold zeros.
        grid = torch.zeros((2, len(flat) * widest), device=device)
        grid[0, cell] = losses
        grid[1, cell] = misses
        sums, missed = grid.view(2, len(flat), widest).sum(dim=2).tolist()  # the one read
        results = iter(
            Continuation(logprob=-loss, tokens=n, greedy=miss == 0, truncated=d)
            for loss, miss, (_, n, d) in zip(sums, missed, flat, strict=True)
        )
        return [[next(results) for _ in example] for example in batch]

    # -- split loss ----------------------------------------------------------

    def split_loss(self, split: str, batches: int | None = None) -> SplitLoss:
        """Mean loss over the fixed evaluation batches of ``split`` (``"train"``, ``"val"``).

        The batches are those a one-process run of the experiment evaluates
        (``train.eval_batches`` of them unless ``batches``), so the value equals
        that run's logged ``val_loss``/``train_loss`` for the same weights.
        """
        import torch

        if self.experiment is None or self.data is None:
            raise NanoGPTError("this task needs an experiment: pass --experiment EXP.toml")
        train = self.experiment.train
        count = batches if batches is not None else train.eval_batches
        fixed = list(
            fixed_loss_batches(
                self.data,
                split,
                seed=self.experiment.seed + EVAL_SEED_OFFSET,
                batch_size=train.batch_size,
                block_size=self.block_size,
                count=count,
            )
        )
        losses = self._map_batches(fixed, self._batch_loss)
        mean = torch.tensor(losses, dtype=torch.float32).mean().item()
        return SplitLoss(loss=mean, sequences=sum(int(x.size(0)) for x, _ in fixed))

    def _batch_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        x, y = (t.to(self.accelerator.device) for t in batch)
        with self.accelerator.autocast():
            _, loss = self.model(x, y)
        return float(loss.float())

    # -- splitting work between processes ------------------------------------

    def _map_batches(self, batches: Sequence[Any], score: Any) -> list[Any]:
        """``[score(b) for b in batches]``, batch ``k`` computed on process ``k % world``."""
        world, rank = self.num_processes, int(self.accelerator.process_index)
        with self.scoring():
            mine = [(k, score(batches[k])) for k in range(rank, len(batches), world)]
            if world > 1 and batches and _sharded(self.model):
                # A model sharded with FSDP gathers its weights with every process at
                # each forward: a process with one batch fewer scores one more, unused.
                for _ in range(-(-len(batches) // world) - len(mine)):
                    score(batches[0])
        if world == 1:
            return [result for _, result in mine]
        from accelerate.utils import gather_object

        gathered = gather_object([mine])
        by_index = dict(pair for part in gathered for pair in part)
        return [by_index[k] for k in range(len(batches))]


def _sharded(model: Any) -> bool:
    """Whether ``model`` is sharded with FSDP2 (``[train] parallelism = "fsdp"``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def fixed_loss_batches(
    data: PreparedData,
    split: str,
    *,
    seed: int,
    batch_size: int,
    block_size: int,
    count: int,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``count`` batches of ``split`` every time: what a loss estimate averages.

    Token data: random windows from a sampler seeded ``seed + rank``. Example
    data: whole examples in a seeded order (not grouped by length), each batch
    shared between ``world`` processes, at most one pass.

    Token ids are not checked against the vocabulary here: that reads the whole
    file, once per run when training starts (or when ``gpt eval`` loads the
    data), not at every evaluation.
    """
    from nanogpt_core.data.example_batches import ExampleBatches
    from nanogpt_core.data.token_windows import MemmapSampler

    source: Any
    if data.kind == "examples":
        eot = data.tokenizer.get("eot_id")
        source = ExampleBatches(
            data.split_path(split),
            data.dtype,
            data.examples(split),
            batch_size,
            seed=seed,
            rank=rank,
            world=world,
            pad_id=eot if isinstance(eot, int) else 0,
            group_by_length=False,
        )
        count = min(count, source.batches_per_epoch)
    else:
        source = MemmapSampler(
            data.split_path(split),
            data.dtype,
            block_size,
            batch_size,
            seed=seed + rank,
        )
    for _ in range(count):
        yield source.next_batch()
