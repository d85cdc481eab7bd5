"""Which GPUs each rank holds a CUDA context on, after the toolkit set up its device.

Run by bench_gpu.py on machines with two or more GPUs: `accelerate launch
--multi_gpu --num_processes 2 gpu_contexts_probe.py`. Each rank builds the
Accelerator as `gpt run` does and allocates on its device; rank 0 then asks
nvidia-smi which GPUs each rank's process holds memory on and prints
`{pid: [gpu index, ...]}` as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess

import torch
from accelerate.utils import gather_object

from nanogpt_core.config.experiment import TrainConfig
from nanogpt_core.train.run import make_accelerator


def query(fields: str, what: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", f"--query-{what}={fields}", "--format=csv,noheader"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [[cell.strip() for cell in line.split(",")] for line in out.strip().splitlines()]


def main() -> None:
    accelerator = make_accelerator(TrainConfig(device="cuda"))
    torch.ones(1, device=accelerator.device)  # this rank's context
    pids = gather_object([os.getpid()])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        index = {uuid: int(i) for i, uuid in query("index,uuid", "gpu")}
        held: dict[str, list[int]] = {str(pid): [] for pid in pids}
        for pid, uuid in query("pid,gpu_uuid", "compute-apps"):
            if pid in held:
                held[pid].append(index[uuid])
        print(json.dumps(held))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
