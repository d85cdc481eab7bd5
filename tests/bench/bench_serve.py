"""Serving benchmark: continuous batching of mixed-length requests in `gpt serve`, on the CPU.

    python tests/bench/bench_serve.py [--quick] [--layers 4]

A checkpoint of GPT-2 small's shape (12 layers, width 768, 12 heads, block
1024, GPT-2 BPE, random weights) is served by a real `gpt serve` process on a
loopback port and driven by real HTTP clients (streamed, greedy completions);
about 3 minutes on 2 CPU cores. `--layers 4` keeps the width, vocabulary and
block size (what a token costs to read, what the KV cache holds) with fewer
layers, where the output layer weighs more; `--quick` is a 2-layer smoke run.

Measured in one run, against references from the same run:

- Greedy tokens/s of 1 streaming client against the same generation in this
  process without a server (what serving costs; best of 3 each, alternating).
- 16 clients at once, prompts spread from 5 to 400 tokens, `max_tokens` 16 to
  128: aggregate generated tokens/s, time to first token (p50, p95), inter-token
  latency (p50, p95); against the same 16 requests with every prompt cut to the
  median length (goal: at least 90 %; the two alternate, best of 2 each), and against the same 16 sent one at a
  time (goal: at least 2x).
- The same 16 clients against a server started with `--no-prepack` (torch's
  own linear layers instead of oneDNN's prepacked ones): what prepacking gives.
- Inter-token latency (p95 and the longest gap) of 4 running streams while a
  400-token prompt arrives, against the same streams with nothing arriving,
  and against a server that prefills whole prompts at once (`--prefill-chunk
  1024`): chunking turns one long stall into several short ones, so the
  longest gap is what it improves (p95 may rise a little).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import attrs
import httpx
import torch
from benchtable import print_table

from nanogpt_core.generate.sampling import encode_prompt, load_model, stream_pieces
from nanogpt_core.model.gpt import GPT, GPTConfig
from nanogpt_core.train.checkpoints import save_checkpoint

GPT2 = {"kind": "gpt2", "name": "gpt2", "vocab_size": 50257, "eot_id": 50256}
HOST = "127.0.0.1"
CLIENTS = 16
# Words that are one GPT-2 token each with their leading space: a prompt of n words is n tokens.
WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "as", "with", "by", "at"]


def write_checkpoint(path: Path, layers: int) -> Path:
    """A GPT-2-small-wide model with random weights, saved as training saves it."""
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=layers, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=True
    )
    checkpoint = {
        "model": GPT(config).state_dict(),
        "model_args": attrs.asdict(config),
        "step": 0,
        "tokenizer": GPT2,
    }
    save_checkpoint(path, checkpoint)
    return path


def prompt_of(tokens: int, rng: random.Random) -> str:
    """A prompt of exactly ``tokens`` GPT-2 tokens."""
    return "".join(" " + rng.choice(WORDS) for _ in range(tokens)).strip()


@attrs.define
class Result:
    """One streamed request: when it started, when each piece of text came."""

    start: float
    times: list[float] = attrs.field(factory=list)
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.times[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


def stream(url: str, prompt: str, max_tokens: int, result: Result) -> Result:
    """Send one streamed greedy completion; record the arrival of every text chunk."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=900) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk["choices"] and chunk["choices"][0]["text"]:
                result.times.append(time.perf_counter())
            if chunk.get("usage"):
                result.tokens = chunk["usage"]["completion_tokens"]
    return result


def at_once(url: str, requests: list[tuple[str, int]], delays: list[float] | None = None):
    """Send ``requests`` from one thread each (after ``delays``); results and wall time."""
    delays = delays or [0.0] * len(requests)
    start = time.perf_counter()
    results = [Result(start + d) for d in delays]

    def client(i: int) -> None:
        time.sleep(delays[i])
        results[i].start = time.perf_counter()
        stream(url, *requests[i], results[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def one_by_one(url: str, requests: list[tuple[str, int]]):
    start = time.perf_counter()
    results = []
    for prompt, max_tokens in requests:
        results.append(stream(url, prompt, max_tokens, Result(time.perf_counter())))
    return results, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(results: list[Result], wall: float) -> dict[str, float]:
    gaps = [g for r in results for g in r.gaps]
    ttfts = [r.ttft for r in results]
    return {
        "rate": sum(r.tokens for r in results) / wall,
        "ttft50": pct(ttfts, 0.5),
        "ttft95": pct(ttfts, 0.95),
        "itl50": pct(gaps, 0.5),
        "itl95": pct(gaps, 0.95),
    }


def in_process(ckpt: Path, prompt: str, tokens: int) -> float:
    """Greedy tokens/s of ``gpt sample``'s generation in this process, without a server."""
    loaded = load_model(ckpt, "cpu")
    ids, _ = encode_prompt(loaded, prompt)
    common = {"temperature": 0.0, "top_k": None, "top_p": None, "generator": None}
    list(stream_pieces(loaded, ids, max_new_tokens=4, **common))  # warm-up
    start = time.perf_counter()
    count = sum(
        len(piece) for piece, _ in stream_pieces(loaded, ids, max_new_tokens=tokens, **common)
    )
    return count / (time.perf_counter() - start)


def start_server(ckpt: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """A `gpt serve` process on a free loopback port, once /health answers."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "nanogpt_core", "serve", "--ckpt", str(ckpt), "--host", HOST,
         "--port", str(port), "--device", "cpu", *options],
    )  # fmt: skip
    url = f"http://{HOST}:{port}"
    for _ in range(1200):
        if process.poll() is not None:
            raise SystemExit("gpt serve exited before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("gpt serve did not become ready in 120 s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=60)


def long_prompt_itl(
    url: str, rng: random.Random, tokens: int, with_long: bool
) -> tuple[float, float]:
    """Inter-token latency (p95, max) of 4 short streams, with or without a long prompt arriving."""
    streams = [(prompt_of(8, rng), tokens) for _ in range(4)]
    requests, delays = streams, [0.0] * 4
    if with_long:
        requests = [*streams, (prompt_of(400, rng), 4)]
        delays = [0.0] * 4 + [0.5]  # once the 4 streams are decoding
    results, _wall = at_once(url, requests, delays)
    gaps = [g for r in results[:4] for g in r.gaps]
    return pct(gaps, 0.95), max(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 layers, shorter answers")
    parser.add_argument("--layers", type=int, default=12, help="layers of the model (default 12)")
    args = parser.parse_args()
    layers = 2 if args.quick else args.layers
    rng = random.Random(0)
    lengths = [round(5 + i * (400 - 5) / (CLIENTS - 1)) for i in range(CLIENTS)]
    rng.shuffle(lengths)
    # Answers of 16 to 128 tokens: with shorter ones the prompts' prefill (the same
    # work batched or not) is most of the run on a CPU.
    answer = [8, 12, 16] if args.quick else [16, 32, 64, 128]
    max_tokens = [answer[i % len(answer)] for i in range(CLIENTS)]
    median = int(statistics.median(lengths))
    mixed = [(prompt_of(n, rng), m) for n, m in zip(lengths, max_tokens, strict=True)]
    cut = [(prompt_of(median, rng), m) for m in max_tokens]
    itl_tokens = 24 if args.quick else 48
    with tempfile.TemporaryDirectory() as folder:
        ckpt = write_checkpoint(Path(folder) / "gpt2_wide.pth", layers)
        lone = (prompt_of(40, rng), itl_tokens)
        process, url = start_server(ckpt)  # defaults: --max-batch 8, --prefill-chunk 64
        try:
            at_once(url, [(prompt_of(50, rng), 4)] * 2)  # warm-up
            # Best of 3, alternating: other processes on a shared machine weigh on one or the other.
            one = direct = 0.0
            for _ in range(3):
                direct = max(direct, in_process(ckpt, *lone))
                one_results, one_wall = one_by_one(url, [lone])
                one = max(one, one_results[0].tokens / one_wall)
            # Alternating, best of 2 by throughput: the two are compared with a 10 % margin.
            runs = [(summary(*at_once(url, mixed)), summary(*at_once(url, cut))) for _ in range(2)]
            mixed_stats = max((r[0] for r in runs), key=lambda r: r["rate"])
            cut_stats = max((r[1] for r in runs), key=lambda r: r["rate"])
            alone_stats = summary(*one_by_one(url, mixed))
            quiet = long_prompt_itl(url, rng, itl_tokens, with_long=False)
            chunked = long_prompt_itl(url, rng, itl_tokens, with_long=True)
        finally:
            stop(process)
        process, url = start_server(ckpt, "--prefill-chunk", "1024")
        try:
            at_once(url, [(prompt_of(50, rng), 4)] * 2)  # warm-up
            whole = long_prompt_itl(url, rng, itl_tokens, with_long=True)
        finally:
            stop(process)
        process, url = start_server(ckpt, "--no-prepack")
        try:
            at_once(url, [(prompt_of(50, rng), 4)] * 2)  # warm-up
            plain = max((summary(*at_once(url, mixed)) for _ in range(2)), key=lambda r: r["rate"])
        finally:
            stop(process)
    shape = f"{layers}x768, block 1024, CPU"
    ms = 1000.0
    m, c, a = mixed_stats, cut_stats, alone_stats
    print_table(
        [
            (
                f"serve tokens/s, 1 streaming client, {itl_tokens} new (ref: in-process)",
                f"{one:,.1f}",
                f"{direct:,.1f}",
                f"{one / direct:.2f}x",
                ">= 0.80x",
            ),
            (
                f"serve tokens/s, {CLIENTS} clients, prompts 5-400 (ref: cut to median "
                f"{median}), {shape}",
                f"{m['rate']:,.1f}",
                f"{c['rate']:,.1f}",
                f"{m['rate'] / c['rate']:.2f}x",
                ">= 0.90x",
            ),
            (
                f"serve tokens/s, {CLIENTS} clients, prompts 5-400 (ref: one at a time)",
                f"{m['rate']:,.1f}",
                f"{a['rate']:,.1f}",
                f"{m['rate'] / a['rate']:.2f}x",
                ">= 2.00x",
            ),
            (
                f"serve tokens/s, {CLIENTS} clients, prompts 5-400, prepacked for oneDNN "
                "(ref: --no-prepack)",
                f"{m['rate']:,.1f}",
                f"{plain['rate']:,.1f}",
                f"{m['rate'] / plain['rate']:.2f}x",
                "informational",
            ),
            (
                "time to first token p50 / p95, ms (ref: one at a time)",
                f"{m['ttft50'] * ms:,.0f} / {m['ttft95'] * ms:,.0f}",
                f"{a['ttft50'] * ms:,.0f} / {a['ttft95'] * ms:,.0f}",
                f"{m['ttft95'] / a['ttft95']:.2f}x",
                "informational",
            ),
            (
                "inter-token latency p50 / p95, ms (ref: one at a time)",
                f"{m['itl50'] * ms:,.1f} / {m['itl95'] * ms:,.1f}",
                f"{a['itl50'] * ms:,.1f} / {a['itl95'] * ms:,.1f}",
                f"{m['itl95'] / a['itl95']:.2f}x",
                "informational",
            ),
            (
                "inter-token latency p95 / max of 4 streams, ms, a 400-token prompt arriving "
                "(ref: none arriving)",
                f"{chunked[0] * ms:,.1f} / {chunked[1] * ms:,.1f}",
                f"{quiet[0] * ms:,.1f} / {quiet[1] * ms:,.1f}",
                f"{chunked[1] / quiet[1]:.2f}x",
                "informational",
            ),
            (
                "same, prompt prefilled in chunks of 64 (ref: whole, --prefill-chunk 1024)",
                f"{chunked[0] * ms:,.1f} / {chunked[1] * ms:,.1f}",
                f"{whole[0] * ms:,.1f} / {whole[1] * ms:,.1f}",
                f"{chunked[1] / whole[1]:.2f}x",
                "max < 1.00x",
            ),
        ]
    )


if __name__ == "__main__":
    main()
