"""fp16 loss scaling on sharded gradients, as far as the CPU allows.

Used by test_fsdp.py: ``accelerate launch --multi_gpu --num_processes 2
fsdp_scaler_probe.py OUT``. Accelerate creates no loss scaler on the CPU and
refuses fp16 training there, so this drives torch's CPU ``GradScaler`` the way
Accelerate's drives a GPU's, on a GPT sharded by the trainer's own code: an
infinity in one process's shard of one gradient must make every process skip
the step and lower its scale, and a finite step must clip by the whole
model's norm. Each rank writes ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from nanogpt_core.model.config import GPTConfig
from nanogpt_core.model.gpt import GPT
from nanogpt_core.train.sharding import clip_sharded, local, shard_model


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)
    model = shard_model(
        GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65))
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(rank))
    record = {}
    for step in ("poisoned", "finite"):
        before = [local(p).clone() for p in model.parameters()]
        _, loss = model(x, x)
        scaler.scale(loss).backward()
        if step == "poisoned" and rank == 1:  # one element of one process's shard
            local(model.lm_head.weight.grad).view(-1)[0] = float("inf")
        scaler.unscale_(optimizer)
        norm = clip_sharded(model.parameters(), 0.5)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        changed = any(
            not torch.equal(b, local(p)) for b, p in zip(before, model.parameters(), strict=True)
        )
        record[step] = {"scale": scaler.get_scale(), "changed": changed, "norm": float(norm)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
