"""The table every benchmark script prints: one row per measurement, with its reference."""

from __future__ import annotations

from collections.abc import Sequence

HEADERS = ("benchmark", "ours", "reference", "ratio", "target")


def print_table(rows: Sequence[tuple[str, str, str, str, str]]) -> None:
    """Print ``rows`` (benchmark, ours, reference, ratio, target) as an aligned table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
    print(" | ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
