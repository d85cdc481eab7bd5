"""Peak memory of one training micro-step, measured in a fresh process (test_memory.py).

    python memory_probe.py LAYERS N_EMBD N_HEAD VOCAB BLOCK BATCH PRECISION OPTIONS_JSON

Prints a JSON object: how far the resident memory grew during one forward and
backward pass through a real Accelerator (``activations``: that growth less the
gradients, which the estimate counts apart), and the parameter count.
"""

from __future__ import annotations

import json
import sys

import psutil
import torch
from accelerate import Accelerator

from nanogpt_core.model.gpt import GPT, GPTConfig


def peak_resident_bytes() -> int:
    """VmHWM: the peak resident memory since the last reset of ``/proc/self/clear_refs``."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    """Measure one shape and precision."""
    layers, embd, heads, vocab, block, batch = map(int, sys.argv[1:7])
    precision, options = sys.argv[7], json.loads(sys.argv[8])
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=layers, n_embd=embd, n_head=heads, vocab_size=vocab, block_size=block, **options
    )
    accelerator = Accelerator(mixed_precision=precision, cpu=True)
    model = accelerator.prepare(GPT(config))
    x = torch.randint(0, vocab, (batch, block))
    # A tiny step first, so kernels and thread pools are set up before measuring.
    with accelerator.autocast():
        _, loss = model(x[:1, :8], x[:1, :8])
    accelerator.backward(loss)
    model.zero_grad(set_to_none=True)
    # Reset the kernel's peak (VmHWM) to the resident memory now: the process's
    # lifetime peak (ru_maxrss) may be an import's, and under memory pressure the
    # resident memory can since have dropped below it (library pages reclaimed).
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = psutil.Process().memory_info().rss
    with accelerator.autocast():
        _, loss = model(x, x)
    accelerator.backward(loss)
    peak = peak_resident_bytes()
    parameters = sum(p.numel() for p in model.parameters())
    print(json.dumps({"activations": peak - before - 4 * parameters, "parameters": parameters}))


if __name__ == "__main__":
    main()
