"""Run a tiny experiment under `accelerate launch` and record what each rank saw.

Used by test_distributed.py: `accelerate launch --multi_gpu --num_processes 2
distributed_probe.py EXPERIMENT RESULTS DATA PROBE_DIR [--set-style overrides]`. Each rank writes
PROBE_DIR/rank<N>.json (test output, outside the run's results folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from nanogpt_core import Callback, NanoGPTError, hookimpl
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.run import run_experiment


class Probe(Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.start_step = -1

    def on_train_start(self, state) -> None:
        # The core restores a checkpoint before any hook: a resumed run shows its step here.
        self.start_step = state.step
        # What this rank's dropout will draw from (each rank must have its own stream).
        self.rng_at_start = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
        rank = state.accelerator.process_index
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"pid{rank}").write_text(str(os.getpid()))

    def on_train_end(self, state) -> None:
        digest = hashlib.sha256()
        for tensor in state.model.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes())
        rank = state.accelerator.process_index
        record = {
            "rank": rank,
            "processes": state.accelerator.num_processes,
            "params_sha256": digest.hexdigest(),
            "is_main": state.is_main_process,
            "start_step": self.start_step,
            "end_step": state.step,
            "status": state.status,
            "rng_at_start": self.rng_at_start,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    experiment, results, data, probe = sys.argv[1:5]
    overrides = sys.argv[5:]

    class ProbePlugin:
        @hookimpl
        def register_callbacks(self, register):
            register("probe", lambda options: Probe(Path(probe)))

    plugins = load_plugins()
    plugins.register(ProbePlugin(), name="probe")
    callbacks = 'callbacks=[{plugin = "probe"}, {plugin = "checkpoint"}]'
    config = load_experiment(experiment, [callbacks, *overrides], plugins)
    try:
        run_experiment(
            config, plugins, results_dir=Path(results), data_dir=Path(data), progress=False
        )
    except NanoGPTError as exc:  # as `gpt run` does: one line and the exit status
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
