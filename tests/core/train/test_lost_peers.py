"""A collective failing on a lost peer becomes one line (exit 75) naming the step to resume from.

The real thing, two nodes and a killed or hung one, is test_multinode.py's;
here the words gloo and NCCL use, and the CLI boundary on a one-process run
whose step's gather is made to fail as gloo's does.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from click.testing import CliRunner

import nanogpt_core.train.trainer as trainer_module
from nanogpt_core.cli import make_cli
from nanogpt_core.train.lost_peers import (
    PeerLost,
    backend_detail,
    is_peer_failure,
    lost_peers,
)

GLOO_RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
    "[127.0.0.1]:9129: Connection reset by peer. This is typically caused by a remote worker "
    "hanging or bugs in the application. Check the logs of the remote worker before reporting "
    "an error. GLHF!"
)
GLOO_TIMEOUT = (
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms "
    "for recv operation to complete"
)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(GLOO_RESET),
        RuntimeError(GLOO_TIMEOUT),
        RuntimeError("Connection closed by peer [10.0.0.2]:4242"),
        dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited"),
        dist.DistNetworkError("Connection refused"),
    ],
)
def test_what_gloo_and_nccl_raise_on_a_lost_peer_is_recognised(error):
    assert is_peer_failure(error)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("connection reset")],
)
def test_other_errors_are_left_alone(error):
    assert not is_peer_failure(error)
    with pytest.raises(type(error)), lost_peers(60, lambda: (3, "relaunch")):
        raise error


def test_the_line_keeps_the_backend_words_without_source_location_or_advice():
    assert backend_detail(RuntimeError(GLOO_RESET)) == (
        "RuntimeError: Read error [127.0.0.1]:9129: Connection reset by peer"
    )
    with pytest.raises(PeerLost) as raised, lost_peers(5, lambda: (12, "relaunch")):
        raise RuntimeError(GLOO_TIMEOUT)
    assert str(raised.value) == (
        "training stopped after step 12: another process did not answer within "
        "train.distributed_timeout_s = 5 s (a hung process or node, or a lost network; "
        "RuntimeError: Timed out waiting 5000ms for recv operation to complete); relaunch"
    )
    assert raised.value.exit_code == 75
    assert isinstance(raised.value.__cause__, RuntimeError)  # --debug shows it


def test_gpt_run_stops_with_one_line_and_exit_75_naming_the_checkpoint(
    tiny_char_experiment, installed_plugins, tmp_path, monkeypatch
):
    experiment = tiny_char_experiment(extra="")
    real_agree = trainer_module.agree
    calls = []

    def agree(*args, **kwargs):
        calls.append(1)
        if len(calls) == 12:  # step 12's gather: the peer is gone
            raise RuntimeError(GLOO_RESET)
        return real_agree(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "agree", agree)
    cli = make_cli(installed_plugins)
    args = ["run", str(experiment), "--results-dir", str(tmp_path / "results")]
    args += ["--data-dir", str(tmp_path / "data"), "--set", "train.save_every=10"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 75, result.output
    last = tmp_path / "results" / "tiny" / "checkpoints" / "last.pth"
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: training stopped after step 11: another process of the run is gone (its node "
        "died, was killed or lost the network; RuntimeError: Read error [127.0.0.1]:9129: "
        "Connection reset by peer); relaunch every node with the same command to resume "
        f"from step 10 ({last})"
    ]
    assert "Traceback" not in result.output

    calls.clear()
    debug = CliRunner().invoke(cli, ["--debug", *args])
    assert isinstance(debug.exception, PeerLost)  # raised, for its traceback
