"""Fine-tuning benchmark: response tokens/s and padding, with and without length grouping.

    python tests/bench/bench_finetune.py [--quick]

Prepares the Alpaca sample beside the repository (GPT-2 BPE, block 512, the
Alpaca template), then trains a 6x384 model on it through the real trainer for
the same number of steps twice in one run: batches grouped by length (ours,
the default) and plain shuffled batches (the reference). Reports response
tokens per second and the share of padding in the batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from benchtable import print_table

from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.run import run_experiment

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca"

EXPERIMENT = """
name = "{name}"
[dataset]
plugin = "alpaca"
source = "local"
train_files = ["{data}"]
skip_empty_output = true
[model]
n_layer = 6
n_head = 6
n_embd = 384
block_size = 512
[train]
batch_size = 8
epochs = 1
steps_per_epoch = {steps}
warmup_steps = 5
eval_every = 1000000
eval_batches = 1
log_every = {steps}
device = "cpu"
group_by_length = {grouped}
"""


def measure(folder: Path, steps: int, grouped: bool) -> dict:
    """Train ``steps`` steps and return the last metrics line (throughput over all steps)."""
    name = "grouped" if grouped else "plain"
    path = folder / f"{name}.toml"
    text = EXPERIMENT.format(
        name=name, data=SHARED / "alpaca_sample.json", steps=steps, grouped=str(grouped).lower()
    )
    path.write_text(textwrap.dedent(text))
    plugins = load_plugins()
    config = load_experiment(path, (), plugins)
    run_experiment(
        config, plugins, results_dir=folder / "results", data_dir=folder / "data", progress=False
    )
    lines = (folder / "results" / name / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10 steps instead of 40")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"the Alpaca sample is not at {SHARED}")
    torch.set_num_threads(os.cpu_count() or 1)
    steps = 10 if args.quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        grouped = measure(folder, steps, grouped=True)
        plain = measure(folder, steps, grouped=False)
    rate, ref_rate = grouped["response_tokens_per_sec"], plain["response_tokens_per_sec"]
    pad, ref_pad = grouped["padding_share"], plain["padding_share"]
    print_table(
        [
            (
                "fine-tuning response tokens/s, 6x384 on Alpaca, batch 8: grouped by length vs not",
                f"{rate:,.1f} tok/s",
                f"{ref_rate:,.1f} tok/s",
                f"{rate / ref_rate:.2f}x",
                ">= 1.00x",
            ),
            (
                "fine-tuning padding share of batched positions: grouped by length vs not",
                f"{pad:.1%}",
                f"{ref_pad:.1%}",
                f"{ref_pad / max(pad, 1e-9):.2f}x less",
                "less padding",
            ),
        ]
    )


if __name__ == "__main__":
    main()
