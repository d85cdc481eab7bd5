"""Continuous batching: rows of every length decode together and each equals its output alone.

The scheduler is driven step by step here, so requests arrive at chosen steps
(staggered, while others prefill or decode) and the checks do not depend on
thread timing; the engine and the HTTP server are checked on top of it.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from nanogpt_core.data.tokenizers import tokenizer_from_description
from nanogpt_core.errors import NanoGPTError
from nanogpt_core.generate.batch_sampling import BatchSampler, RowSettings
from nanogpt_core.generate.sampling import LoadedModel
from nanogpt_core.generate.scheduler import Scheduler
from nanogpt_core.generate.serve_generation import (
    Finish,
    GenerationFailed,
    Job,
    Piece,
    Row,
    Sampling,
)
from nanogpt_core.generate.serve_memory import (
    check_kv_fits,
    kv_cache_bytes,
    kv_problem,
    resolve_dtype,
    to_dtype,
)
from nanogpt_core.model.batch_cache import kv_bytes_per_token
from nanogpt_core.model.gpt import GPT, GPTConfig
from nanogpt_core.model.kv_cache import KVCache
from nanogpt_core.model.next_token import pick_next_token
from nanogpt_core.model.packed_linear import pack_linears

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?\n"
# No end-of-text: every row runs to its max_tokens, past block_size where asked.
TOKENIZER = tokenizer_from_description(
    {"kind": "char", "name": "char", "vocab_size": 32, "eot_id": None, "chars": CHARS}
)
POSITIONS = {
    "learned": {"bias": True},
    "rope": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},
}
BLOCK = 16
# What batched logits may differ from those of the row alone: padded, masked
# attention and batched matmuls sum in another order (measured: about 1e-6).
LOGIT_TOLERANCE = 1e-5


def loaded_model(position: str) -> LoadedModel:
    torch.manual_seed(0)
    config = GPTConfig(
        block_size=BLOCK, vocab_size=32, n_layer=2, n_head=2, n_embd=32, **POSITIONS[position]
    )
    return LoadedModel(GPT(config).eval(), TOKENIZER, 0, torch.device("cpu"))


class Collector:
    """A job's pieces, finishes and error, as the engine would stream them."""

    def __init__(self, ids: list[int], sampling: Sampling) -> None:
        self.texts: dict[int, str] = {}
        self.finishes: dict[int, tuple[str, int]] = {}
        self.error: BaseException | None = None
        self.ended = False
        self.job = Job(ids, sampling, self.emit, self.done)

    def emit(self, item: Piece | Finish) -> None:
        if isinstance(item, Piece):
            self.texts[item.index] = self.texts.get(item.index, "") + item.text
        else:
            self.finishes[item.index] = (item.reason, item.completion_tokens)

    def done(self, error: BaseException | None) -> None:
        assert not self.ended, "done twice"
        self.ended, self.error = True, error


def drive(scheduler: Scheduler, arrivals: dict[int, list[Collector]]) -> int:
    """Step until every job arrived and finished; jobs join at their step. Steps taken."""
    step, last = 0, max(arrivals)
    while step <= last or scheduler.busy:
        for collector in arrivals.get(step, []):
            scheduler.add(collector.job)
        scheduler.step()
        step += 1
    return step


def alone_greedy(loaded: LoadedModel, ids: list[int], tokens: int) -> tuple[str, list]:
    """The unbatched path (``gpt sample``'s): greedy text and each step's logits."""
    model = loaded.model
    idx = torch.tensor([ids[-BLOCK:]])
    cache = KVCache(model.config)
    logits_seen = []
    with torch.no_grad():
        logits, _ = model(idx, cache=cache)
        for _ in range(tokens):
            logits_seen.append(logits[0, -1])
            token = torch.argmax(logits[:, -1], dim=-1, keepdim=True)
            idx = torch.cat((idx, token), dim=1)
            logits, cache = model.next_logits(idx, cache)
    text = TOKENIZER.decode(idx[0, len(ids[-BLOCK:]) :].tolist())
    return text, logits_seen


@pytest.mark.parametrize("packed", [False, True], ids=["linear", "prepacked"])
@pytest.mark.parametrize("position", list(POSITIONS))
def test_staggered_rows_of_every_length_equal_their_output_alone(position, packed, monkeypatch):
    loaded = loaded_model(position)
    served = loaded
    if packed:  # what `gpt serve` decodes with on the CPU; the reference stays unpacked
        served = LoadedModel(copy.deepcopy(loaded.model), TOKENIZER, 0, torch.device("cpu"))
        assert pack_linears(served.model, rows=3) > 0
    g = torch.Generator().manual_seed(1)
    lengths = [1, 3, 16, 7, 12, 2, 9, 15, 5, 20]  # 20: a prompt cut to block_size
    max_tokens = [30, 5, 40, 12, 25, 33, 8, 20, 3, 18]  # 40 tokens: past block_size twice
    prompts = [torch.randint(0, 32, (n,), generator=g).tolist() for n in lengths]
    collectors = [
        Collector(p, Sampling(max_tokens=m, temperature=0.0))
        for p, m in zip(prompts, max_tokens, strict=True)
    ]
    # Record the logits each row sampled from, in order (keyed by the row's settings,
    # which hold its own generator).
    seen: dict[RowSettings, list[torch.Tensor]] = {}
    batch_sample = BatchSampler.sample

    def recording(self, logits, vocab_limit):
        for settings, row_logits in zip(self.settings, logits, strict=True):
            seen.setdefault(settings, []).append(row_logits.clone())
        return batch_sample(self, logits, vocab_limit)

    monkeypatch.setattr(BatchSampler, "sample", recording)
    scheduler = Scheduler(served, max_batch=3, prefill_chunk=5)
    c = collectors
    drive(scheduler, {0: c[0:2], 2: [c[2]], 3: [c[3]], 10: c[4:6], 11: [c[6]], 30: c[7:]})
    assert scheduler.largest_batch == 3
    references = []
    for collector, ids, tokens in zip(collectors, prompts, max_tokens, strict=True):
        expected, logits = alone_greedy(loaded, ids, tokens)
        references.append(logits)
        assert collector.error is None and collector.ended
        assert collector.texts[0] == expected
        assert collector.finishes == {0: ("length", tokens)}
    # Each row's logits, step by step, against the row alone (rows told apart by length).
    worst = 0.0
    for got, want in zip(sorted(seen.values(), key=len), sorted(references, key=len), strict=True):
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(got, want, strict=True)))
    print(f"{position}: largest logit difference {worst:.2e}")
    assert worst < LOGIT_TOLERANCE, worst


def test_vectorised_sampler_equals_row_by_row_sampling():
    torch.manual_seed(0)
    rows = [
        RowSettings(0.0),
        RowSettings(1.0),
        RowSettings(0.7, top_k=5),
        RowSettings(1.3, top_p=0.6),
        RowSettings(0.9, top_k=20, top_p=0.9),
        RowSettings(0.5, top_k=1),
        RowSettings(2.0, top_p=1.0),
    ]
    vocab, limit = 64, 60  # the last 4: padding of the vocabulary, never sampled

    def generators():
        return [torch.Generator().manual_seed(10 + b) for b in range(len(rows))]

    batched_gens, single_gens = generators(), generators()
    settings = [
        RowSettings(r.temperature, r.top_k, r.top_p, g)
        for r, g in zip(rows, batched_gens, strict=True)
    ]
    sampler = BatchSampler(settings, "cpu")
    for _ in range(50):
        logits = torch.randn(len(rows), vocab) * 3
        draw = sampler.sample(logits, limit)
        expected = [
            int(
                pick_next_token(
                    logits[b : b + 1].clone(), r.temperature, r.top_k, r.top_p, g, limit
                )
            )
            for b, (r, g) in enumerate(zip(rows, single_gens, strict=True))
        ]
        assert draw.tokens == expected
        assert not any(draw.bad)
        assert max(draw.tokens) < limit


def test_a_failing_row_fails_its_request_alone():
    loaded = loaded_model("learned")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
    good = [Collector(p, Sampling(max_tokens=12, temperature=0.0)) for p in prompts]
    seeded = Collector([3, 4], Sampling(max_tokens=12, temperature=0.8, seed=5, n=2))
    bad_seed = Collector([1, 2], Sampling(max_tokens=12, seed=2**64))  # torch refuses it
    tiny_temperature = Collector([7, 8, 9], Sampling(max_tokens=12, temperature=1e-300))
    raising = Collector([12, 13], Sampling(max_tokens=12, temperature=0.0))
    take = Row.take

    def poisoned_take(self, token):
        if self.job is raising.job and self.count == 3:
            raise RuntimeError("poisoned")
        return take(self, token)

    expected = [alone_greedy(loaded, p, 12)[0] for p in prompts]
    alone = Collector([3, 4], Sampling(max_tokens=12, temperature=0.8, seed=5, n=2))
    drive(Scheduler(loaded, max_batch=8), {0: [alone]})
    Row.take = poisoned_take
    try:
        scheduler = Scheduler(loaded, max_batch=8, prefill_chunk=2)
        everyone = [good[0], bad_seed, good[1], tiny_temperature, raising, seeded, *good[2:]]
        drive(scheduler, {0: everyone[:4], 1: everyone[4:]})
    finally:
        Row.take = take
    assert scheduler.largest_batch >= 5
    assert [c.texts[0] for c in good] == expected
    assert all(c.error is None and c.ended for c in good)
    assert seeded.texts == alone.texts and seeded.error is None
    for failed, words in (
        (bad_seed, "Overflow"),
        (tiny_temperature, "not finite"),
        (raising, "poisoned"),
    ):
        assert isinstance(failed.error, GenerationFailed), failed.error
        assert words in str(failed.error) or words in str(failed.error.__cause__)
    assert len(raising.texts.get(0, "")) == 3 and not raising.finishes  # what came before
    assert not scheduler.busy


def test_engine_batches_mixed_lengths_cancels_and_times_out():
    from nanogpt_core.generate.engine import Engine

    loaded = loaded_model("rope")
    prompts = [[5], [9, 10, 11, 12, 13, 14, 15], [13, 14, 15], list(range(1, 30))]
    settings = [
        Sampling(max_tokens=30, temperature=0.0),
        Sampling(max_tokens=7, temperature=0.0),
        Sampling(max_tokens=30, temperature=0.9, top_k=20, seed=3),
        Sampling(max_tokens=30, temperature=0.9, top_p=0.8, seed=4, n=2),
    ]

    async def collect(engine: Engine, ids: list[int], sampling: Sampling) -> dict:
        texts: dict[int, str] = {}
        finishes = {}
        async for item in engine.generate(ids, sampling):
            if isinstance(item, Piece):
                texts[item.index] = texts.get(item.index, "") + item.text
            else:
                finishes[item.index] = (item.reason, item.completion_tokens)
        return {"texts": texts, "finishes": finishes}

    async def alone() -> list[dict]:
        engine = Engine(loaded, max_batch=8)
        try:
            return [await collect(engine, i, s) for i, s in zip(prompts, settings, strict=True)]
        finally:
            engine.shutdown()

    async def together() -> tuple[list[dict], int]:
        engine = Engine(loaded, max_batch=8)
        try:
            results = await asyncio.gather(
                *(collect(engine, i, s) for i, s in zip(prompts, settings, strict=True))
            )
            return list(results), engine.largest_batch
        finally:
            engine.shutdown()

    async def cancel_and_time_out() -> tuple[int, int, tuple]:
        engine = Engine(loaded, max_batch=2, request_timeout=0.5)
        try:
            endless = engine.generate([1, 2], Sampling(max_tokens=10**9, temperature=0.0))
            await anext(endless)  # the first token, sampled after the prefill
            await anext(endless)  # a decode step's: the row is in the batch
            busy = engine.batch_size
            await endless.aclose()  # the client left
            for _ in range(100):
                if engine.batch_size == 0:
                    break
                await asyncio.sleep(0.01)
            freed = engine.batch_size
            timed = await collect(engine, [3], Sampling(max_tokens=10**9, temperature=0.0))
            return busy, freed, timed["finishes"][0]
        finally:
            engine.shutdown()

    expected = asyncio.run(alone())
    batched, largest = asyncio.run(together())
    assert largest >= 2
    assert batched == expected
    assert batched[1]["finishes"][0] == ("length", 7)
    assert set(batched[3]["finishes"]) == {0, 1}
    assert batched[3]["texts"][0] != batched[3]["texts"][1]  # each choice its own generator
    busy, freed, (reason, tokens) = asyncio.run(cancel_and_time_out())
    assert (busy, freed, reason) == (1, 0, "length")
    assert 0 < tokens < 10**9


def test_kv_cache_bytes_and_the_max_batch_check():
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
    # GPT-2 small: 2 x 12 layers x 768 x 2 bytes = 36 KiB per row and token in half precision.
    assert kv_bytes_per_token(config, torch.float16) == 2 * 12 * 768 * 2 == 36864
    assert kv_bytes_per_token(config, torch.float32) == 73728
    # 8 rows and the prefill row, 1024 tokens each: 9 x 36 MiB.
    assert kv_cache_bytes(config, 8, torch.bfloat16) == 9 * 1024 * 36864
    assert kv_problem(config, 8, torch.bfloat16, free=9 * 1024 * 36864) is None
    problem = kv_problem(config, 64, torch.float16, free=2**30)
    assert problem is not None and "\n" not in problem
    assert problem.startswith("--max-batch 64: the KV cache needs 2.29 GiB")  # 65 x 36 MiB
    assert problem.endswith("use --max-batch 27 or less")  # 28 rows of 36 MiB fit in 1 GiB
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
     ((9, 0), torch.bfloat16), ((6, 1), torch.float32)],
)  # fmt: skip
def test_auto_dtype_follows_the_gpus_compute_capability(monkeypatch, capability, expected):
    # No GPU here: the capability CUDA would report is what --dtype auto decides on.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == expected
    assert resolve_dtype("float32", torch.device("cuda", 0)) == torch.float32


def test_a_max_batch_that_cannot_fit_the_gpu_is_refused_before_start(monkeypatch):
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
    cuda = torch.device("cuda", 0)
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 16 * 2**30))
    check_kv_fits(config, 8, torch.float16, cuda)  # 324 MiB fit in 1 GiB
    with pytest.raises(NanoGPTError, match=r"^--max-batch 64: .* use --max-batch 27 or less$"):
        check_kv_fits(config, 64, torch.float16, cuda)
    assert emptied  # the float32 copies a cast left behind count as free
    check_kv_fits(config, 10**6, torch.float32, torch.device("cpu"))  # the CPU is not checked


def test_half_precision_keeps_rope_frequencies_and_caches_in_its_dtype():
    loaded = loaded_model("rope")
    frequencies = loaded.model.rope_inv_freq.clone()
    to_dtype(loaded.model, torch.bfloat16)
    assert loaded.model.transformer.wte.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.model.rope_inv_freq, frequencies)  # still float32
    scheduler = Scheduler(loaded, max_batch=2, prefill_chunk=4)
    assert scheduler.cache.keys[0].dtype == torch.bfloat16
    jobs = [Collector(list(range(1, n)), Sampling(max_tokens=20, temperature=0.0)) for n in (3, 9)]
    drive(scheduler, {0: jobs[:1], 2: jobs[1:]})
    assert all(c.error is None and len(c.texts[0]) == 20 for c in jobs)


def test_serve_option_defaults_are_the_engines():
    from nanogpt_core.cli.generate_commands import serve
    from nanogpt_core.generate.engine import MAX_BATCH, MAX_QUEUE
    from nanogpt_core.generate.scheduler import PREFILL_CHUNK

    defaults = {p.name: p.default for p in serve.params}
    assert (defaults["max_batch"], defaults["max_queue"]) == (MAX_BATCH, MAX_QUEUE)
    assert defaults["prefill_chunk"] == PREFILL_CHUNK
