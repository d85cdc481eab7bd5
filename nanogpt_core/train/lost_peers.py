"""When another process of a run dies or hangs: one line instead of a backend's traceback.

Under ``accelerate launch`` every step waits for every process in a collective
(the gradient all-reduce, the step's figures). When a peer's process or node
dies, gloo raises on the closed socket at once; when it hangs (a stuck node, a
network partition), the collective raises after the process group's timeout
(``[train] distributed_timeout_s``). Either way the survivors would end in a
``RuntimeError`` or ``DistBackendError`` traceback from deep inside torch.
:func:`lost_peers` turns those into :class:`PeerLost`: one line saying what
happened, the step the run reached, and that relaunching every node resumes
from the last checkpoint. NCCL's watchdog may instead abort the process
(SIGABRT) when its own timeout passes; nothing can be said then.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator

from nanogpt_core.errors import TrainingError

# What gloo and NCCL say when a peer went away or stopped answering; gloo's
# errors are plain RuntimeErrors, so their words are all there is to go by.
PEER_FAILURE_WORDS = (
    "connection reset by peer",
    "connection closed by peer",
    "connection refused",
    "broken pipe",
    "timed out waiting",
    "gloo/transport",
    "nccl error",
    "processgroupnccl",
    "remote process exited",
)
# gloo prefixes its messages with the C++ source location: "[.../pair.cc:537] ".
SOURCE_LOCATION = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")


class PeerLost(TrainingError):
    """Another process of the run died, hung or lost the network: exit status 75.

    75 is ``EX_TEMPFAIL`` (sysexits.h): a temporary failure, the command may be
    run again, and relaunching every node resumes from ``last.pth``.
    """

    exit_code = 75


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another process went away."""
    dist = sys.modules.get("torch.distributed")  # never import torch just for this
    dist_error = getattr(dist, "DistError", None) if dist is not None else None
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(word in text for word in PEER_FAILURE_WORDS)


def backend_detail(exc: BaseException) -> str:
    """The backend's own words, short: its first line, without source location or advice."""
    lines = str(exc).strip().splitlines()
    text = SOURCE_LOCATION.sub("", lines[0] if lines else "")
    # gloo goes on with "This is typically caused by ... GLHF!": keep the first sentence.
    text = text.split(". ")[0].rstrip(".")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def peer_lost_message(exc: BaseException, timeout_s: int, step: int | None, resume: str) -> str:
    """The line a survivor stops with: what happened, how far the run got, what to do.

    :param timeout_s: the process group's timeout (``train.distributed_timeout_s``).
    :param step: the steps this launch got to, or None when it stopped before training.
    :param resume: what relaunching every node does (resume from which checkpoint).
    """
    detail = backend_detail(exc)
    if "timed out" in detail.lower() or "timeout" in detail.lower():
        what = (
            "another process did not answer within train.distributed_timeout_s = "
            f"{timeout_s} s (a hung process or node, or a lost network"
        )
    else:
        what = "another process of the run is gone (its node died, was killed or lost the network"
    after = "" if step is None else f" after step {step}"
    return f"training stopped{after}: {what}; {detail}); {resume}"


@contextlib.contextmanager
def lost_peers(timeout_s: int, progress: Callable[[], tuple[int | None, str]]) -> Iterator[None]:
    """Turn a collective failing on a lost peer inside the block into :class:`PeerLost`.

    :param timeout_s: the process group's timeout, named in the message.
    :param progress: called after the failure: the steps done (None before
        training) and what relaunching every node resumes from.
    """
    try:
        yield
    except Exception as exc:
        if not is_peer_failure(exc):
            raise
        raise PeerLost(peer_lost_message(exc, timeout_s, *progress())) from exc
