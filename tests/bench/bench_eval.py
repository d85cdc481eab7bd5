"""HellaSwag benchmark: examples scored per second at GPT-2-small shapes on the CPU.

    python tests/bench/bench_eval.py [--quick]

Ours: the ``hellaswag`` task through the core's Evaluator (8 examples, 32
endings, per padded forward pass). Reference, measured in the same run on the
same weights: llm.c's ``hellaswag.py`` loop over Hugging Face's
``GPT2LMHeadModel``, one example (its four endings) per forward pass. Both
score the same examples of ``../shared/data/hellaswag/`` with GPT-2's BPE and
must agree on every prediction. Goal: >= 1.0x.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from benchtable import print_table
from torch.nn import functional as F

from nanogpt_core.data.tokenizers import gpt2_encoding
from nanogpt_core.eval.evaluator import Evaluator
from nanogpt_core.model.gpt import GPT, GPTConfig
from nanogpt_core.model.hf_gpt2 import to_hf_state_dict

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "hellaswag"


class Tiktoken:
    """GPT-2's BPE as the Evaluator's tokenizer."""

    def __init__(self) -> None:
        self.encoding = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def start_ids(self) -> list[int]:
        return [50256]


def ours(model: GPT, rows: list[dict]) -> tuple[float, list[int]]:
    """Seconds for our Evaluator, and its acc_norm picks."""
    tokenizer = Tiktoken()
    evaluator = Evaluator(
        model=model, tokenizer=tokenizer, accelerator=Accelerator(cpu=True), batch_size=8
    )
    examples = [
        [(tokenizer.encode(r["ctx"]), tokenizer.encode(" " + e)) for e in r["endings"]]
        for r in rows
    ]
    start = time.perf_counter()
    scores = evaluator.loglikelihood(examples)
    seconds = time.perf_counter() - start
    picks = [min(range(4), key=lambda i, s=s: s[i].mean_loss) for s in scores]
    return seconds, picks


def reference(hf_model, rows: list[dict]) -> tuple[float, list[int]]:
    """llm.c's loop: one example's four endings per forward pass, right-padded."""
    encoding = gpt2_encoding()
    picks = []
    start = time.perf_counter()
    for row in rows:
        context = encoding.encode_ordinary(row["ctx"])
        tails = [encoding.encode_ordinary(" " + e) for e in row["endings"]]
        width = max(len(context) + len(t) for t in tails)
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, tail in enumerate(tails):
            tokens[i, : len(context) + len(tail)] = torch.tensor(context + tail)
            mask[i, len(context) : len(context) + len(tail)] = 1
        with torch.no_grad():
            logits = hf_model(tokens).logits
        losses = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="none"
        ).view(4, -1)
        shift = mask[:, 1:]
        mean = (losses * shift).sum(1) / shift.sum(1)
        picks.append(int(mean.argmin()))
    return time.perf_counter() - start, picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="8 examples instead of 48")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from transformers import GPT2Config, GPT2LMHeadModel

    count = 8 if args.quick else 48
    lines = (SAMPLE / "hellaswag_val_sample.jsonl").read_text().splitlines()[:count]
    rows = [json.loads(line) for line in lines]
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=True
    )
    model = GPT(config).eval()
    hf = GPT2LMHeadModel(
        GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50304)
    ).eval()
    hf.load_state_dict(to_hf_state_dict(model), strict=False)
    ours(model, rows[:2])  # warm-up
    reference(hf, rows[:2])
    our_seconds, our_picks = ours(model, rows)
    ref_seconds, ref_picks = reference(hf, rows)
    assert our_picks == ref_picks, "the two scorers disagree"
    ours_rate, ref_rate = count / our_seconds, count / ref_seconds
    print_table(
        [
            (
                f"HellaSwag examples/s, GPT-2 small (random weights), {count} examples: "
                "Evaluator (batch 8) vs llm.c's loop over HF GPT2LMHeadModel",
                f"{ours_rate:.2f}",
                f"{ref_rate:.2f}",
                f"{ours_rate / ref_rate:.2f}x",
                ">= 1.00x",
            )
        ]
    )


if __name__ == "__main__":
    main()
