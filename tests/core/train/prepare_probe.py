"""The main process prepares for longer than the training process group's timeout.

Used by test_distributed.py: `accelerate launch --multi_gpu --num_processes 2
prepare_probe.py FOLDER ok|fails`. The process group is started with a 3-second
timeout; rank 0's preparation takes 8 seconds (and, with ``fails``, then raises a
DataError). Each rank writes FOLDER/rank<N>.json or FOLDER/exit<N>.json.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

from accelerate import PartialState

from nanogpt_core import DataError, NanoGPTError
from nanogpt_core.config.experiment import TrainConfig
from nanogpt_core.main_process import on_main_process
from nanogpt_core.train.run import make_accelerator


def main() -> None:
    folder, outcome = Path(sys.argv[1]), sys.argv[2]
    # The training group, with a timeout far shorter than the preparation.
    PartialState(cpu=True, timeout=datetime.timedelta(seconds=3))
    accelerator = make_accelerator(TrainConfig(device="cpu"))
    rank = accelerator.process_index
    marker = folder / "prepared"
    calls = 0

    def prepare() -> str:
        nonlocal calls
        calls += 1
        if marker.exists():
            return marker.read_text()
        time.sleep(8)
        if outcome == "fails":
            raise DataError("bad rows in the source")
        marker.write_text(f"by rank {rank}")
        return marker.read_text()

    try:
        prepared = on_main_process(accelerator, prepare, others="repeat")
    except NanoGPTError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        (folder / f"exit{rank}.json").write_text(json.dumps(exc.exit_code))
        sys.exit(exc.exit_code)
    accelerator.wait_for_everyone()  # the training group still works afterwards
    (folder / f"rank{rank}.json").write_text(json.dumps({"prepared": prepared, "calls": calls}))


if __name__ == "__main__":
    main()
