"""Run the ``gpt`` command with the Hugging Face hub replaced, recording who asked it.

Used by test_hellaswag_hub.py under ``accelerate launch``:
``hellaswag_hub_probe.py CALLS_DIR ROWS.jsonl|fail GPT-ARGS...``. Each call of
``datasets.load_dataset`` appends the dataset's name to ``CALLS_DIR/rank<N>``
(N from the launcher's ``RANK``), then serves the rows of ``ROWS.jsonl`` or,
with ``fail``, raises the error an offline machine gets. Each process writes
its exit status to ``CALLS_DIR/rank<N>.exit`` (the status ``gpt`` chose: a
process may still abort in torch's teardown after it, see the test); a failed
rank 0 waits (10 s at most) for rank 1's, since the launcher stops the others
once one has exited.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    calls, source = Path(sys.argv[1]), sys.argv[2]
    rank = os.environ.get("RANK", "0")

    def load_dataset(name, *args, **kwargs):
        calls.mkdir(parents=True, exist_ok=True)
        with (calls / f"rank{rank}").open("a") as handle:
            handle.write(name + "\n")
        if source == "fail":
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")
        return iter(json.loads(line) for line in Path(source).read_text().splitlines())

    import datasets

    datasets.load_dataset = load_dataset
    # The stand-in "is" at localhost, which resolves offline (the core looks the host up first).
    os.environ["HF_ENDPOINT"] = "http://localhost"

    from nanogpt_core.cli import main as gpt

    try:
        gpt(sys.argv[3:])
    except SystemExit as exc:
        sys.stdout.flush()
        calls.mkdir(parents=True, exist_ok=True)
        (calls / f"rank{rank}.exit").write_text(str(exc.code))
        deadline = time.monotonic() + 10
        while rank == "0" and exc.code and time.monotonic() < deadline:
            if (calls / "rank1.exit").exists():
                break
            time.sleep(0.1)
        raise


if __name__ == "__main__":
    main()
