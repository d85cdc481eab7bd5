"""Serving benchmark: `gpt serve` throughput and time to first token on the CPU.

    python tests/bench/bench_serve.py [--quick]

A GPT-2-small-shaped checkpoint (12x768, block 1024, GPT-2 BPE, random weights)
is served by a real `gpt serve` process on a loopback port. Greedy streamed
completions of a fixed length measure generated tokens/s for 1 client and for 8
concurrent clients (all tokens over wall time), and the time to first token of
a lone request. References: the same generation in this process without HTTP
(`stream_pieces`) for 1 client, so the ratio shows what serving costs; for 8
clients, the same server with `--max-concurrency 8` (8 threads, one request
each) against `--max-concurrency 1`, where the 7 that wait decode as one batch.
"""

from __future__ import annotations

import argparse
import json
import socket
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
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
HOST = "127.0.0.1"
CLIENTS = 8


def write_checkpoint(path: Path) -> Path:
    """A GPT-2-small-shaped model with random weights, saved as training saves it."""
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=True
    )
    model = GPT(config)
    checkpoint = {
        "model": model.state_dict(),
        "model_args": attrs.asdict(config),
        "step": 0,
        "tokenizer": GPT2,
    }
    save_checkpoint(path, checkpoint)
    return path


def in_process(ckpt: Path, tokens: int) -> tuple[float, float]:
    """(tokens/s, seconds to the first token) of greedy generation without a server."""
    loaded = load_model(ckpt, "cpu")
    ids, _ = encode_prompt(loaded, PROMPT)
    common = {"temperature": 0.0, "top_k": None, "top_p": None, "generator": None}
    list(stream_pieces(loaded, ids, max_new_tokens=4, **common))  # warm-up
    start = time.perf_counter()
    first = None
    for _ in stream_pieces(loaded, ids, max_new_tokens=tokens, **common):
        first = first or time.perf_counter() - start
    return tokens / (time.perf_counter() - start), first or 0.0


def stream_once(url: str, tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first text) of one streamed greedy completion."""
    body = {
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, generated = None, 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
    return generated, first or 0.0


def concurrent(url: str, tokens: int) -> float:
    """Generated tokens/s of CLIENTS streaming clients at once (all tokens over wall time)."""
    counts: list[int] = []

    def client() -> None:
        counts.append(stream_once(url, tokens)[0])

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return sum(counts) / (time.perf_counter() - start)


def start_server(ckpt: Path, concurrency: int) -> tuple[subprocess.Popen, str]:
    """A `gpt serve` process on a free loopback port, once /health answers."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "nanogpt_core", "serve", "--ckpt", str(ckpt), "--host", HOST,
         "--port", str(port), "--device", "cpu", "--max-concurrency", str(concurrency)],
    )  # fmt: skip
    url = f"http://{HOST}:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit("gpt serve exited before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("gpt serve did not become ready in 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="8 tokens a request instead of 32")
    args = parser.parse_args()
    tokens = 8 if args.quick else 32
    with tempfile.TemporaryDirectory() as folder:
        ckpt = write_checkpoint(Path(folder) / "gpt2_small.pth")
        direct_rate, direct_first = in_process(ckpt, tokens)
        process, url = start_server(ckpt, 1)
        try:
            stream_once(url, 4)  # warm-up
            start = time.perf_counter()
            generated, first = stream_once(url, tokens)
            one_rate = generated / (time.perf_counter() - start)
            batched_rate = concurrent(url, tokens)
        finally:
            process.terminate()
            process.wait(timeout=60)
        process, url = start_server(ckpt, CLIENTS)
        try:
            stream_once(url, 4)  # warm-up
            threaded_rate = concurrent(url, tokens)
        finally:
            process.terminate()
            process.wait(timeout=60)
    shape = "GPT-2 small, CPU"
    print_table(
        [
            (
                f"serve tokens/s, 1 client, {tokens} new, {shape} (ref: in-process)",
                f"{one_rate:,.1f}",
                f"{direct_rate:,.1f}",
                f"{one_rate / direct_rate:.2f}x",
                ">= 0.80x",
            ),
            (
                f"serve tokens/s, {CLIENTS} clients, {tokens} new each: batched "
                f"(--max-concurrency 1) vs {CLIENTS} threads (--max-concurrency {CLIENTS})",
                f"{batched_rate:,.1f}",
                f"{threaded_rate:,.1f}",
                f"{batched_rate / threaded_rate:.2f}x",
                ">= 1.00x",
            ),
            (
                f"serve tokens/s, {CLIENTS} clients batched (ref: 1 client)",
                f"{batched_rate:,.1f}",
                f"{one_rate:,.1f}",
                f"{batched_rate / one_rate:.2f}x",
                "informational",
            ),
            (
                "serve time to first token, s (ref: in-process)",
                f"{first:.3f}",
                f"{direct_first:.3f}",
                f"{first / direct_first:.2f}x",
                "informational",
            ),
        ]
    )


if __name__ == "__main__":
    main()
