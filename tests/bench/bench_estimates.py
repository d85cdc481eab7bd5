"""The memory estimator against measurements: a CPU micro-step's activations, a checkpoint's size.

    python tests/bench/bench_estimates.py [--quick]

``estimate_training_memory`` (``nanogpt_core/train/memory.py``) is what the
run's memory check and ``gpt plan`` trust. For three shapes (the blocks
dominate: a char model; the vocabulary dominates: GPT-2 small's width and
vocabulary, two layers; Llama's options: RoPE, RMSNorm, SwiGLU, qk-norm), in
float32 and under bf16 autocast, each variant runs in a fresh process through
``tests/core/train/memory_probe.py`` (the probe the slow test uses): one real
micro-step through an ``Accelerator``, its peak resident memory (VmHWM, reset
just before the step) less the memory before it and less the gradients; the
median of three such processes. The estimate's ``activations`` is set against
that; the target is the issue's "within 25 %". A shape where the estimate is
known to be off is reported apart, outside that verdict (docs/benchmarks.md).
Last, a checkpoint: the estimate (weights 4 bytes and AdamW 8 bytes per
parameter) against the size of a real ``torch.save`` of a model's and its
optimizer's state after one step (the run's AdamW, built through the optimizer
plugin). ``--quick`` measures smaller shapes and batches, once each, fp32 and
bf16 for two shapes, and a smaller checkpoint, in under a minute.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchtable import print_table

PROBE = Path(__file__).resolve().parents[1] / "core" / "train" / "memory_probe.py"
LLAMA = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True}
# name: (layers, n_embd, n_head, vocab, block, batch, options), as memory_probe.py
# takes them. The full shapes are test_memory.py's PEAK_SHAPES; the quick ones
# keep each shape's character (blocks, vocabulary, options dominate) at a
# fraction of the work: the same depths, so that the blocks keep their share
# against the output layer and the backward pass's working set.
SHAPES = {
    "char 6x384": (6, 384, 6, 65, 256, 64, {}),
    "GPT-2 width 2x768": (2, 768, 12, 50304, 1024, 4, {}),
    "Llama options 4x256": (4, 256, 4, 8192, 512, 16, LLAMA),
}
# Outside the three shapes, reported apart: a micro-batch of a few hundred
# tokens against GPT-2's tied vocabulary, where the step's peak is the end of the
# backward pass (docs/benchmarks.md, "Memory estimates").
KNOWN_GAPS = {"GPT-2 width 1x768, few tokens": (1, 768, 12, 50304, 256, 1, {})}
QUICK_SHAPES = {
    "char 6x128": (6, 128, 4, 65, 256, 16, {}),
    "Llama options 4x128": (4, 128, 4, 8192, 256, 4, LLAMA),
}
# The checkpoint's model: the char shape (about 10.7M parameters, a 128 MB file).
CHECKPOINT = (6, 384, 6, 65, 256)
QUICK_CHECKPOINT = (6, 128, 4, 65, 256)
PRECISIONS = {"no": "fp32", "bf16": "bf16 autocast"}
LOW, HIGH = 0.75, 1.25


def gpt_config(layers: int, embd: int, heads: int, vocab: int, block: int, **options: Any) -> Any:
    """The ``GPTConfig`` of one shape."""
    from nanogpt_core.model.gpt import GPTConfig

    return GPTConfig(
        n_layer=layers, n_embd=embd, n_head=heads, vocab_size=vocab, block_size=block, **options
    )


def measure_activations(shape: tuple, precision: str) -> int:
    """Bytes memory_probe.py measures for one micro-step of ``shape``, in its own process."""
    *sizes, options = shape
    args = [*map(str, sizes), precision, json.dumps(options)]
    done = subprocess.run(
        [sys.executable, str(PROBE), *args], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["activations"]


def checkpoint_bytes(shape: tuple[int, int, int, int, int]) -> int:
    """Size of a ``torch.save`` of {model, optimizer} state after one AdamW step (in this process)."""
    import tempfile

    import torch

    from nanogpt_core.config.experiment import TrainConfig
    from nanogpt_core.model.gpt import GPT
    from nanogpt_core.plugins.registry import load_plugins
    from nanogpt_core.train.optimization import make_optimizer

    torch.manual_seed(0)
    config = gpt_config(*shape)
    model = GPT(config)
    optimizer = make_optimizer(load_plugins(), TrainConfig(), model, "cpu")
    x = torch.randint(0, config.vocab_size, (2, config.block_size))
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()  # AdamW allocates its two moments (and a step count) on the first step
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ckpt.pth"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        return path.stat().st_size


def in_fresh_process(flag: str, quick: bool) -> int:
    """Run this script's ``flag`` part in a new Python and return the number it prints."""
    command = [sys.executable, __file__, flag, *(["--quick"] if quick else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    """``1,234.5 MiB``."""
    return f"{n / 2**20:,.1f} MiB"


def activation_rows(
    shapes: dict[str, tuple], repeats: int, target: str
) -> tuple[list[tuple[str, ...]], list[float]]:
    """One row per shape and precision (estimate, measured, ratio), and the ratios."""
    from nanogpt_core.train.memory import estimate_training_memory

    rows, ratios = [], []
    for name, shape in shapes.items():
        layers, embd, heads, vocab, block, batch, options = shape
        config = gpt_config(layers, embd, heads, vocab, block, **options)
        for precision, words in PRECISIONS.items():
            # The same step measures up to ~10 % apart from one fresh process to
            # the next (a fifth, once, on a shared machine): the median of a few.
            runs = sorted(measure_activations(shape, precision) for _ in range(repeats))
            measured = runs[len(runs) // 2]
            estimated = estimate_training_memory(
                config, batch_size=batch, precision=precision
            ).activations
            ratios.append(estimated / measured)
            measures = ", ".join(mib(run) for run in runs)
            print(
                f"  {name} {words}: estimated {mib(estimated)}, measured {measures}",
                file=sys.stderr,
            )
            spread = f" ({runs[0] / 2**20:,.0f}-{runs[-1] / 2**20:,.0f})" if repeats > 1 else ""
            rows.append(
                (
                    f"activation MiB, {name} V={vocab} B={batch} T={block}, {words}: "
                    "estimate vs measured" + (f" (median of {repeats})" if repeats > 1 else ""),
                    mib(estimated),
                    mib(measured) + spread,
                    f"{estimated / measured:.2f}x",
                    target,
                )
            )
    return rows, ratios


def verdict_row(ratios: list[float]) -> tuple[str, ...]:
    """Whether every ratio of the issue's shapes is within [LOW, HIGH]."""
    inside = sum(LOW <= r <= HIGH for r in ratios)
    return (
        f"every activation estimate above within [{LOW}, {HIGH}] of the measured peak",
        f"{'yes' if inside == len(ratios) else 'NO'} ({inside} of {len(ratios)})",
        "-",
        f"{min(ratios):.2f}-{max(ratios):.2f}x",
        "yes",
    )


def checkpoint_row(shape: tuple[int, int, int, int, int], quick: bool) -> tuple[str, ...]:
    """The checkpoint estimate (weights and AdamW state) against a real file's size."""
    from nanogpt_core.train.memory import estimate_training_memory

    saved = in_fresh_process("--checkpoint", quick)
    estimate = estimate_training_memory(gpt_config(*shape), batch_size=1, precision="no")
    estimated = estimate.weights + estimate.optimizer
    print(f"  checkpoint: estimated {estimated:,} bytes, saved {saved:,}", file=sys.stderr)
    layers, embd, _, vocab, _ = shape
    return (
        f"checkpoint MiB, {layers}x{embd} V={vocab} ({estimate.parameters:,} parameters) "
        "after one AdamW step: 12 bytes/parameter vs torch.save of {model, optimizer}",
        mib(estimated),
        mib(saved),
        f"{estimated / saved:.4f}x",
        "0.95-1.05x",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer variants")
    parser.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    checkpoint_shape = QUICK_CHECKPOINT if args.quick else CHECKPOINT
    if args.checkpoint:
        print(json.dumps(checkpoint_bytes(checkpoint_shape)))
        return
    target = f"{LOW:.2f}-{HIGH:.2f}x"
    repeats = 1 if args.quick else 3
    rows, ratios = activation_rows(QUICK_SHAPES if args.quick else SHAPES, repeats, target)
    rows.append(verdict_row(ratios))
    if not args.quick:
        rows += activation_rows(KNOWN_GAPS, repeats, "- (known gap)")[0]
    rows.append(checkpoint_row(checkpoint_shape, args.quick))
    print_table(rows)


if __name__ == "__main__":
    main()
