"""``metrics.jsonl``: one JSON line per logged step, appended as training goes.

Appending is the only write during training, so a crash or a full disk can tear
the last line. Nothing downstream may trip on that: a resumed run rewrites the
file (atomically) without the lines it cannot parse and without those past the
step it resumes from, and says how many torn lines it dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nanogpt_core.files import atomic_write_text, storage_errors


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

    def append(self, record: dict[str, Any]) -> None:
        """Append one line and flush it."""
        if not self.enabled:
            return
        with storage_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
