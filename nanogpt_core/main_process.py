"""Work the main process does for all: preparing data, downloading a data set.

Under ``accelerate launch`` one process (rank 0) does what must happen once,
and the others wait for it. They wait on a gloo process group of their own with
:data:`MAIN_PROCESS_TIMEOUT`, never in a collective of the training process
group: that group's timeout is sized for training steps (NCCL's default is 10
minutes), far shorter than preparing FineWeb-Edu or a slow download. The main
process's outcome is broadcast before anyone waits in another collective, so a
failure stops every process with the same one line instead of leaving the
others waiting for a process that has gone.
"""

from __future__ import annotations

import datetime
import pickle
import sys
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from nanogpt_core.errors import NanoGPTError, PluginFault

T = TypeVar("T")

# How long the other processes wait for the main one.
MAIN_PROCESS_TIMEOUT = datetime.timedelta(hours=48)


class MainProcessError(NanoGPTError):
    """What the other processes raise when the main one failed in :func:`on_main_process`.

    Its message and exit status are the main process's, so every process
    reports the same line.
    """

    def __init__(self, message: str, exit_code: int = NanoGPTError.exit_code) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def on_main_process(
    accelerator: Any, work: Callable[[], T], *, others: Literal["share", "repeat"]
) -> T:
    """``work()`` on the main process first; the others get its result or its error.

    :param others: ``"share"``: the others never call ``work`` and receive its
        (pickled) result, for what one process fetches for all. ``"repeat"``:
        once the main process succeeded, the others call ``work`` themselves and
        find it done (a prepared data folder they then open).
    """
    if accelerator.num_processes == 1:
        return work()
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=MAIN_PROCESS_TIMEOUT)
    try:
        if accelerator.is_main_process:
            return _lead(work, group, share=others == "share")
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0, group=group)
        outcome = pickle.loads(message[0])
        if outcome[0] == "error":
            raise MainProcessError(outcome[1], exit_code=outcome[2])
        return outcome[1] if others == "share" else work()
    finally:
        dist.destroy_process_group(group)


def _lead(work: Callable[[], T], group: Any, *, share: bool) -> T:
    """The main process's side: run ``work``, then tell the others how it went."""
    import torch.distributed as dist

    failure: BaseException | None = None
    try:
        result = work()
        # Pickled here, so an unpicklable result fails inside the try rather
        # than in the broadcast, where the others would wait.
        message = [pickle.dumps(("ok", result if share else None))]
    except NanoGPTError as exc:
        failure = exc
        message = [pickle.dumps(("error", str(exc), exc.exit_code))]
    except BaseException as exc:  # a bug or Ctrl-C: the main process keeps its traceback
        failure = exc
        text = f"the main process failed: {type(exc).__name__}: {exc}"
        code = 130 if isinstance(exc, KeyboardInterrupt) else PluginFault.exit_code
        message = [pickle.dumps(("error", text, code))]
    dist.broadcast_object_list(message, src=0, group=group)
    if failure is not None:
        raise failure
    return result


def end_process_group() -> None:
    """Shut down the process group ``accelerate launch`` started, if this process has one.

    A process that exits with its gloo or NCCL group still up can abort in
    the group's threads ("terminate called without an active exception")
    after its work is done, turning a good run's exit status into SIGABRT.
    """
    dist = sys.modules.get("torch.distributed")  # never import torch just for this
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
