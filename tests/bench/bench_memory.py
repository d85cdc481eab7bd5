"""Peak memory of a training micro-step: no logits returned vs logits returned, and
activation checkpointing vs none.

    python tests/bench/bench_memory.py [--quick]

With targets, ``GPT.forward`` returns ``(None, loss)``. The reference is the
same model returning its (B, T, V) logits as well, as nanoGPT's does: under
Accelerate's mixed precision the wrapper then copies them to fp32, and the
trainer's ``_, loss = model(x, y)`` keeps that copy alive through the backward
pass. Each variant runs in a fresh process (GPT-2 small's width and vocabulary,
two layers, T = 1024, bf16 autocast on the CPU through a real ``Accelerator``);
the figure is the peak resident memory during one forward and backward pass
minus the resident memory just before it.

Activation checkpointing (``[train] activation_checkpointing``) is measured the
same way on GPT-2 small's whole shape (12 layers of 768, V = 50304, T = 1024,
two sequences, float32 as on a CPU run), with and without it. The growth holds
the gradients (474 MiB) too, which do not shrink.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from benchtable import print_table


def measure(variant: str, batch: int, layers: int) -> float:
    """Peak RSS growth (MiB) of one micro-step in a fresh process.

    ``variant``: "ours", "reference" (logits returned too), "plain" or
    "checkpointed" (activation checkpointing; these two in float32).
    """
    import psutil
    import torch
    from accelerate import Accelerator

    from nanogpt_core.model.gpt import GPT, GPTConfig

    class LogitsToo(GPT):
        """The reference: forward returns the full logits with the loss."""

        def forward(self, idx, targets=None, cache=None):
            if targets is None:
                return super().forward(idx, targets, cache)
            logits = self.head_logits(self.hidden(idx))
            loss = torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )
            return logits, loss

    torch.manual_seed(0)
    config = GPTConfig(n_layer=layers, block_size=1024, vocab_size=50304, bias=True)
    model = (LogitsToo if variant == "reference" else GPT)(config)
    model.activation_checkpointing = variant == "checkpointed"
    fp32 = variant in ("plain", "checkpointed")
    accelerator = Accelerator(mixed_precision="no" if fp32 else "bf16", cpu=True)
    model = accelerator.prepare(model)
    x = torch.randint(0, config.vocab_size, (batch, 1024))
    y = torch.randint(0, config.vocab_size, (batch, 1024))
    before = psutil.Process().memory_info().rss
    with accelerator.autocast():
        _, loss = model(x, y)  # as the trainer does: `_` lives through the backward pass
    accelerator.backward(loss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - before) / 2**20


def in_fresh_process(variant: str, batch: int, layers: int) -> float:
    """:func:`measure` in a process of its own (the peak is a whole process's)."""
    command = [sys.executable, __file__, "--variant", variant, "--shape", f"{batch}x{layers}"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    grown = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {variant}: peak grew {grown:,.0f} MiB", file=sys.stderr, flush=True)
    return grown


def checkpointing_row(quick: bool) -> tuple[str, str, str, str, str]:
    """Peak memory of GPT-2 small (12 x 768) with activation checkpointing vs without."""
    layers, batch = (2, 1) if quick else (12, 2)
    plain = in_fresh_process("plain", batch, layers)
    checkpointed = in_fresh_process("checkpointed", batch, layers)
    return (
        f"peak MiB of an fp32 micro-step, {layers}x768, V=50304, B={batch}, T=1024: "
        "activation_checkpointing = true vs false",
        f"{checkpointed:,.0f} MiB",
        f"{plain:,.0f} MiB",
        f"{checkpointed / plain:.2f}x",
        "< 1.00x",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="batch 1 (a smoke run)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        batch, layers = map(int, args.shape.split("x"))
        print(json.dumps(measure(args.variant, batch, layers)))
        return
    batch, layers = (1, 1) if args.quick else (4, 2)
    grown = {variant: in_fresh_process(variant, batch, layers) for variant in ("ours", "reference")}
    logits_fp32 = batch * 1024 * 50304 * 4 / 2**20
    print_table(
        [
            (
                f"peak MiB of a bf16 micro-step, B={batch} T=1024 V=50304 "
                f"(an fp32 logits copy is {logits_fp32:,.0f} MiB)",
                f"{grown['ours']:,.0f} MiB",
                f"{grown['reference']:,.0f} MiB",
                f"{grown['ours'] / grown['reference']:.2f}x",
                "< 1.00x",
            ),
            checkpointing_row(args.quick),
        ]
    )


if __name__ == "__main__":
    main()
