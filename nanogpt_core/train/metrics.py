"""``metrics.jsonl``: one JSON line per logged step, appended as training goes.

Appending is the only write during training, so a crash or a full disk can tear
the last line. Nothing downstream may trip on that: a resumed run rewrites the
file (atomically) without the lines it cannot parse and without those past the
step it resumes from, and says how many torn lines it dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nanogpt_core.files import atomic_write_text, storage_errors

# Tags of the losses; every other key of a metrics line is a tag of its own name.
SCALAR_TAGS = {"train_loss": "train/loss", "val_loss": "val/loss"}
# Keys of a metrics line that place it (the x axis) rather than measure something.
PLACE_KEYS = ("step", "epoch")


def metric_scalars(record: Mapping[str, Any]) -> dict[str, float | int]:
    """The numeric values of a metrics line by logger tag, for TensorBoard and W&B alike.

    ``train_loss`` and ``val_loss`` become ``train/loss`` and ``val/loss``; every
    other key (``lr``, ``tokens``, ``eval/hellaswag/acc_norm``) keeps its name.
    ``step`` and ``epoch``, ``None`` (an MFU on unknown hardware) and anything
    that is not a number are left out.
    """
    return {
        SCALAR_TAGS.get(key, key): value
        for key, value in record.items()
        if key not in PLACE_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a metrics file and how many lines could not be parsed."""
    records: list[dict[str, Any]] = []
    torn = 0
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return records, 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            torn += 1
    return records, torn


class MetricsLog:
    """Appends metric records to ``metrics.jsonl`` (main process only).

    :param path: the file.
    :param enabled: false on processes that must not write.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> int:
        """Keep only the parseable lines up to ``step``; returns how many torn lines went.

        Lines past ``step`` are those a killed run logged after its last
        checkpoint: the resumed run logs them again.
        """
        if not self.enabled or not self.path.exists():
            return 0
        records, torn = read_metrics(self.path)
        kept = [r for r in records if r["step"] <= step]
        if torn or len(kept) != len(records):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return torn

    def append_step(
        self,
        step: int,
        epoch: int,
        metrics: Mapping[str, Any],
        measured: Mapping[str, Any],
        elapsed_s: float,
    ) -> dict[str, Any]:
        """Build a training step's line once, append it, and return it (callbacks get the same).

        :param metrics: the step's ``tokens``, ``train_loss``, ``lr`` (and each
            group's ``lr/<name>`` where they differ), ``grad_norm`` and
            ``skipped_steps`` (the guards' count so far).
        :param measured: throughput (``tokens_per_sec``, ``mfu``, ...) and, at an
            evaluation, the estimated ``train_loss`` and ``val_loss`` (which
            replace the step's own ``train_loss``).
        """
        record: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            **{key: metrics[key] for key in ("tokens", "train_loss", "lr")},
            **{key: value for key, value in metrics.items() if key.startswith("lr/")},
            "grad_norm": metrics["grad_norm"],
            "skipped_steps": metrics.get("skipped_steps", 0),
            **measured,
            "elapsed_s": elapsed_s,
        }
        self.append(record)
        return record

    def append(self, record: dict[str, Any]) -> None:
        """Append one line and flush it."""
        if not self.enabled:
            return
        with storage_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
