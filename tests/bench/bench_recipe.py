"""The faster recipe against nanoGPT's, side by side on the CPU, measured in the same run.

    python tests/bench/bench_recipe.py [--quick]

1. Tiny Shakespeare characters: ``experiments/cpu/shakespeare_char_cpu.toml``
   (nanoGPT's baby run: AdamW, cosine, GPT-2 blocks, 2,000 steps) against
   ``experiments/cpu/shakespeare_char_fast.toml`` (the new recipe, same
   callbacks, evaluation and checkpoint settings). Reported: the old recipe's
   final val loss, and for each recipe the steps and seconds (``elapsed_s``,
   evaluations included, as a user waits for them) until its val loss first
   reaches it, and each final val loss. Goal: the new recipe gets there in at
   most half the old recipe's wall time.
2. GPT-2 BPE TinyStories at equal wall time: ``experiments/cpu/tinystories_cpu.toml``
   against ``tinystories_cpu_fast.toml``, both pointed at the samples in
   ``../shared/data/tinystories/`` (as shipped they read the hub). A short
   calibration run measures each recipe's seconds per step, then each trains
   for the steps that fit the same budget. Reported: both final val losses.

``--quick`` runs a few steps of each, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchtable import print_table

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
CPU = REPO / "experiments" / "cpu"
OLD, NEW = CPU / "shakespeare_char_cpu.toml", CPU / "shakespeare_char_fast.toml"
STORIES_OLD, STORIES_NEW = CPU / "tinystories_cpu.toml", CPU / "tinystories_cpu_fast.toml"
# The samples the TinyStories rows have always been measured on.
STORIES_LOCAL = [
    "dataset.source=local",
    f'dataset.train_files=["{SHARED / "tinystories" / "derived_train.parquet"}"]',
    f'dataset.val_files=["{SHARED / "tinystories" / "derived_validation.parquet"}"]',
]


def gpt_run(experiment: Path, work: Path, *overrides: str) -> list[dict]:
    """Run one experiment from scratch in ``work``; its metrics records."""
    name = experiment.stem
    command = [sys.executable, "-m", "nanogpt_core", "run", str(experiment), "--fresh"]
    command += ["--results-dir", str(work / "results"), "--data-dir", str(work / "data")]
    for assignment in overrides:
        command += ["--set", assignment]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    print(f"  running {name} {' '.join(overrides)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    lines = (work / "results" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def evaluations(records: list[dict]) -> list[dict]:
    """The records with a val loss, in step order."""
    return [r for r in records if "val_loss" in r]


def first_reaching(records: list[dict], target: float) -> dict | None:
    """The first evaluation whose val loss is at or below ``target``."""
    return next((r for r in evaluations(records) if r["val_loss"] <= target), None)


def shakespeare_rows(work: Path, quick: bool) -> list[tuple[str, str, str, str, str]]:
    common = [f"dataset.path={SHARED / 'tinyshakespeare' / 'input.txt'}"]
    if quick:
        common += ["train.steps_per_epoch=20", "train.eval_every=10", "train.warmup_steps=2"]
    old = gpt_run(OLD, work, *common)
    new = gpt_run(NEW, work, *common)
    target = evaluations(old)[-1]["val_loss"]
    old_hit, new_hit = first_reaching(old, target), first_reaching(new, target)
    rows = [
        (
            "Tiny Shakespeare chars: final val loss (old recipe's is the target)",
            f"{evaluations(new)[-1]['val_loss']:.4f}",
            f"{target:.4f}",
            "-",
            "-",
        )
    ]
    if new_hit is None:
        rows.append(("seconds to the old final val loss", "not reached", "-", "-", "<= 0.50x"))
        return rows
    rows += [
        (
            "steps to the old recipe's final val loss",
            f"{new_hit['step']:,}",
            f"{old_hit['step']:,}",
            f"{new_hit['step'] / old_hit['step']:.2f}x",
            "-",
        ),
        (
            "seconds to the old recipe's final val loss (evaluations included)",
            f"{new_hit['elapsed_s']:.1f}",
            f"{old_hit['elapsed_s']:.1f}",
            f"{new_hit['elapsed_s'] / old_hit['elapsed_s']:.2f}x",
            "<= 0.50x",
        ),
    ]
    return rows


def seconds_per_step(experiment: Path, work: Path, common: list[str], steps: int) -> float:
    records = gpt_run(
        experiment, work, *common, f"train.steps_per_epoch={steps}", f"train.eval_every={steps}"
    )
    logged = [r for r in records if "val_loss" not in r]
    # Between the first and last plain log line: no start-up, no evaluation.
    first, last = logged[0], logged[-1]
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])


def stories_rows(work: Path, quick: bool, budget: float) -> list[tuple[str, str, str, str, str]]:
    common = list(STORIES_LOCAL)
    calibration = 21 if quick else 40  # two log lines at least (log_every = 10)
    old_rate = seconds_per_step(STORIES_OLD, work, common, calibration)
    new_rate = seconds_per_step(STORIES_NEW, work, common, calibration)
    results = {}
    for name, experiment, rate in (("old", STORIES_OLD, old_rate), ("new", STORIES_NEW, new_rate)):
        steps = max(10, int(budget / rate))
        records = gpt_run(
            experiment,
            work,
            *common,
            f"train.steps_per_epoch={steps}",
            f"train.eval_every={steps}",
        )
        results[name] = (steps, evaluations(records)[-1])
    (old_steps, old_last), (new_steps, new_last) = results["old"], results["new"]
    return [
        (
            f"TinyStories GPT-2 BPE, {budget:.0f} s of training each: final val loss",
            f"{new_last['val_loss']:.4f} ({new_steps} steps, {new_last['elapsed_s']:.0f} s)",
            f"{old_last['val_loss']:.4f} ({old_steps} steps, {old_last['elapsed_s']:.0f} s)",
            f"{new_last['val_loss'] / old_last['val_loss']:.3f}x",
            "lower",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a few steps of each, to check the script"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        rows = shakespeare_rows(work, args.quick)
        rows += stories_rows(work, args.quick, budget=20.0 if args.quick else 180.0)
    print_table(rows)


if __name__ == "__main__":
    main()
