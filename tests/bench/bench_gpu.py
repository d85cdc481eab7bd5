"""The GPU check: GPT-2 small trained through our Trainer on one CUDA device.

    python tests/bench/bench_gpu.py [--steps 300] [--batch-size 16]

For a session that has a GPU (never CI): confirms the CUDA paths (bf16 autocast,
or fp16 with loss scaling where the GPU lacks bf16; flash attention through
scaled_dot_product_attention; fused AdamW; torch.compile) and prints tokens/s
and MFU for eager and compiled runs on random GPT-2 tokens. Exits with a
message where there is no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from benchtable import print_table

from nanogpt_core.callbacks import RunPaths
from nanogpt_core.config import ExperimentConfig, ModelConfig, PluginSpec, TrainConfig
from nanogpt_core.datasets import PreparedData
from nanogpt_core.run import make_accelerator
from nanogpt_core.trainer import Trainer


def fake_gpt2_data(folder: Path, tokens: int) -> PreparedData:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 50257, tokens, dtype=np.uint16).tofile(folder / f"{split}.bin")
    meta = {
        "tokenizer": {"kind": "gpt2", "name": "gpt2", "vocab_size": 50257, "eot_id": 50256},
        "dtype": "uint16",
        "splits": {s: {"tokens": tokens} for s in ("train", "val")},
    }
    return PreparedData(folder, meta)


GPT2_SMALL = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)
# --cpu-smoke: the same plumbing on a tiny model, to check this script without a GPU.
SMOKE = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)


def train(
    root: Path,
    data: PreparedData,
    steps: int,
    batch: int,
    precision: str,
    compile_: bool,
    smoke: bool,
) -> dict:
    train_cfg = TrainConfig(
        batch_size=batch, steps_per_epoch=steps, warmup_steps=2, eval_every=steps,
        eval_batches=5, log_every=max(1, steps // 10), mixed_precision=precision,
        compile=compile_, device="cpu" if smoke else "cuda",
    )  # fmt: skip
    model = SMOKE if smoke else GPT2_SMALL
    config = ExperimentConfig(
        name="gpu", dataset=PluginSpec(plugin="none"), model=model, train=train_cfg
    )
    paths = RunPaths(root / ("compiled" if compile_ else "eager"))
    trainer = Trainer(config, data, [], paths, make_accelerator(train_cfg), progress=False)
    trainer.fit()
    lines = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    steady = lines[len(lines) // 2 :]  # skip warm-up and compilation
    fused = trainer.optimizer.optimizer.defaults.get("fused")
    return {
        "tokens_per_sec": sum(r["tokens_per_sec"] for r in steady) / len(steady),
        "mfu": sum(r["mfu"] or 0.0 for r in steady) / len(steady),
        "val_loss": lines[-1]["val_loss"],
        "fused": fused,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="a tiny model on the CPU (checks the script)"
    )
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if smoke:
        name, precision, args.steps = "cpu", "no", 4
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs only on a GPU machine (or use --cpu-smoke)")
    else:
        name = torch.cuda.get_device_name()
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    print(f"device: {name}, torch {torch.__version__}, precision {precision}")
    print(f"flash attention enabled: {torch.backends.cuda.flash_sdp_enabled()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = fake_gpt2_data(root, 20_000_000)
        eager = train(root, data, args.steps, args.batch_size, precision, False, smoke)
        compiled = train(root, data, args.steps, args.batch_size, precision, True, smoke)
    print(
        f"fused AdamW: {eager['fused']}; final val loss eager {eager['val_loss']:.3f}, compiled {compiled['val_loss']:.3f}"
    )
    print_table(
        [
            (
                f"GPT-2 small tokens/s, {precision}, compile vs eager",
                f"{compiled['tokens_per_sec']:,.0f}",
                f"{eager['tokens_per_sec']:,.0f}",
                f"{compiled['tokens_per_sec'] / eager['tokens_per_sec']:.2f}x",
                ">= 1.30x",
            ),
            (
                f"MFU on {name}, compile vs eager",
                f"{compiled['mfu']:.1%}",
                f"{eager['mfu']:.1%}",
                "-",
                "informational",
            ),
        ]
    )


if __name__ == "__main__":
    main()
