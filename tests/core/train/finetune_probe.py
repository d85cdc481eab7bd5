"""Fine-tune under `accelerate launch` and record which examples each rank trained on.

Used by test_finetune.py: `accelerate launch --multi_gpu --num_processes 2
finetune_probe.py EXPERIMENT RESULTS DATA PROBE_DIR`. Each rank writes
PROBE_DIR/rank<N>.json with the example indices of every training batch it built
(test output, outside the run's results folder).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.data.example_batches import ExampleBatches
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.run import run_experiment


def main() -> None:
    experiment, results, data, probe = sys.argv[1:5]
    seen: list[list[int]] = []
    collate = ExampleBatches.collate

    def recording(self, indices):
        if self.group_by_length:  # training batches; evaluation batches are not grouped
            seen.append([int(i) for i in indices])
        return collate(self, indices)

    ExampleBatches.collate = recording
    plugins = load_plugins()
    config = load_experiment(experiment, [], plugins)
    run_experiment(config, plugins, results_dir=Path(results), data_dir=Path(data), progress=False)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(probe).mkdir(parents=True, exist_ok=True)
    (Path(probe) / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
