"""Generation benchmark: tokens/s with the KV cache against full recomputation.

    python tests/bench/bench_sampling.py [--quick]

Greedy decoding of 500 new tokens (100 with --quick) from a one-token prompt,
for a 6-layer/384-wide block-256 model and for GPT-2-small shapes, with and
without the cache, measured in the same run. Goal: >= 3x at GPT-2-small shapes.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from benchtable import print_table

from nanogpt_core.model.gpt import GPT, GPTConfig


def tokens_per_second(model: GPT, new_tokens: int, use_cache: bool) -> float:
    prompt = torch.zeros(1, 1, dtype=torch.long)
    model.generate(prompt, 5, temperature=0, use_cache=use_cache)  # warm-up
    start = time.perf_counter()
    model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100 new tokens instead of 500")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    new_tokens = 100 if args.quick else 500
    shapes = [
        (
            "6x384, block 256",
            GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50304, bias=True),
        ),
        (
            "GPT-2 small 12x768, block 1024",
            GPTConfig(
                n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=True
            ),
        ),
    ]
    rows = []
    for name, config in shapes:
        torch.manual_seed(0)
        model = GPT(config).eval()
        cached = tokens_per_second(model, new_tokens, use_cache=True)
        full = tokens_per_second(model, new_tokens, use_cache=False)
        target = ">= 3.00x" if "GPT-2" in name else "informational"
        rows.append(
            (
                f"greedy tokens/s, {new_tokens} new, {name}: KV cache vs recompute",
                f"{cached:,.1f}",
                f"{full:,.1f}",
                f"{cached / full:.2f}x",
                target,
            )
        )
    print_table(rows)


if __name__ == "__main__":
    main()
