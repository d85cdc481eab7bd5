"""Two "nodes" on this machine: one ``accelerate launch`` per node, as docs/multi-node.md shows.

Each node runs one CPU process (gloo) of a 2-process run: ``--multi_gpu
--num_machines 2 --num_processes 2 --machine_rank 0|1`` with node 0's address
and port. Only global rank 0 may write; SIGTERM on every node (a SLURM
preemption) must save and exit so that a relaunch resumes; a node killed
outright must end the other in one line within 60 s; relaunching both must
then end with exactly the metrics of the uninterrupted single-node 2-process
run of the same experiment; and a hung node must end the other after
``train.distributed_timeout_s``.

A test-only callback (``pace``, installed as a distribution of its own on
PYTHONPATH, entry point and all) sleeps after each step, so that a signal lands
mid-run however fast the machine is; it changes no figure the run computes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from conftest import SHARED_DATA, TINY_CHAR_EXPERIMENT

pytestmark = pytest.mark.slow

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# Seconds each step sleeps (the pace callback): 40 steps take at least 4 s.
PACE_S = "0.1"
PACE_PLUGIN = '''
"""Sleep after every step (test_multinode.py): signals then land mid-run."""
import os
import time

from nanogpt_core import Callback, hookimpl


class Pace(Callback):
    def on_step_end(self, state):
        time.sleep(float(os.environ.get("NANOGPT_TEST_PACE_S", "0")))


@hookimpl
def register_callbacks(register):
    register("pace", lambda options: Pace(), description="Sleep after every step.")
'''
EXPERIMENT_EXTRA = """save_every = 10

[[callbacks]]
plugin = "pace"
"""
# What a run computes, as metrics.jsonl records it (not how fast it went).
COMPUTED = ("step", "epoch", "tokens", "train_loss", "lr", "grad_norm", "val_loss")
PEER_GONE = "another process of the run is gone"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Setup:
    """The experiment file, the shared data folder, and how to launch it."""

    def __init__(self, folder: Path) -> None:
        if not SHARED_DATA.is_dir():
            pytest.skip(f"real data samples not found at {SHARED_DATA}")
        self.folder = folder
        site = folder / "site"
        (site / "nanogpt_pace-0.dist-info").mkdir(parents=True)
        (site / "nanogpt_pace.py").write_text(PACE_PLUGIN)
        (site / "nanogpt_pace-0.dist-info" / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: nanogpt-pace\nVersion: 0\n"
        )
        (site / "nanogpt_pace-0.dist-info" / "entry_points.txt").write_text(
            "[nanogpt]\npace = nanogpt_pace\n"
        )
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
            "NANOGPT_TEST_PACE_S": PACE_S,
        }
        text = TINY_CHAR_EXPERIMENT.format(
            name="tiny", path=SHARED_DATA / "tinyshakespeare" / "input.txt"
        )
        self.experiment = folder / "tiny.toml"
        self.experiment.write_text(text + EXPERIMENT_EXTRA)
        self.data = folder / "data"

    def run_args(self, results: Path, *extra: str) -> list[str]:
        return [
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "nanogpt_core", "run", str(self.experiment),
            "--results-dir", str(results), "--data-dir", str(self.data), *extra,
        ]  # fmt: skip

    def single_node(self, results: Path) -> subprocess.CompletedProcess:
        """The single-node 2-process run, unpaced: nothing signals it."""
        command = [
            ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(free_port()), *self.run_args(results),
        ]  # fmt: skip
        return subprocess.run(
            command,
            env={**self.env, "NANOGPT_TEST_PACE_S": "0"},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def nodes(
        self, tag: str, roots: tuple[Path, Path], *extra: str, pace: str = PACE_S
    ) -> list[Node]:
        """Start both nodes, each in a process group of its own (as on two machines)."""
        env = {**self.env, "NANOGPT_TEST_PACE_S": pace}
        port = str(free_port())
        nodes = []
        for rank, results in enumerate(roots):
            command = [
                ACCELERATE, "launch", "--quiet", "--multi_gpu",
                "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                *self.run_args(results, *extra),
            ]  # fmt: skip
            nodes.append(Node(command, env, self.folder / f"{tag}-node{rank}"))
        return nodes


class Node:
    """One node's ``accelerate launch``, its output in files."""

    def __init__(self, command: list[str], env: dict[str, str], prefix: Path) -> None:
        self.stdout_path = prefix.with_suffix(".out")
        self.stderr_path = prefix.with_suffix(".err")
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=err, start_new_session=True
            )

    @property
    def output(self) -> str:
        return self.stdout_path.read_text() + self.stderr_path.read_text()

    def signal_launcher(self, sig: int) -> None:
        """``sig`` to the launcher's process group, as SLURM signals a job step's task."""
        os.killpg(self.process.pid, sig)

    def kill_node(self, sig: int = signal.SIGKILL) -> None:
        """``sig`` (SIGKILL) to every process of the node: the launcher and its workers.

        The elastic agent starts each worker in a session of its own, so the
        launcher's process group alone would leave the worker running.
        """
        launcher = psutil.Process(self.process.pid)
        groups = {os.getpgid(p.pid) for p in [launcher, *launcher.children(recursive=True)]}
        for group in groups:
            os.killpg(group, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_node()
            raise AssertionError(f"hung: {self.output[-3000:]}") from None


def wait_for(condition: Callable[[], bool], nodes: list[Node], what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        if any(node.process.poll() is not None for node in nodes) or time.monotonic() > deadline:
            outputs = "\n".join(node.output[-2000:] for node in nodes)
            raise AssertionError(f"never saw {what}:\n{outputs}")
        time.sleep(0.05)


def logged_steps(run: Path) -> list[int]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def computed(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k in COMPUTED} for line in lines]


def saved_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.pth", weights_only=True)["step"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return Setup(tmp_path_factory.mktemp("multinode"))


@pytest.fixture(scope="module")
def reference(setup: Setup) -> list[dict]:
    """The single-node 2-process run's metrics (which also prepares the shared data)."""
    done = setup.single_node(setup.folder / "single")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = computed(setup.folder / "single" / "tiny")
    assert [m["step"] for m in metrics] == list(range(5, 41, 5))
    return metrics


def test_preempted_then_killed_node_then_relaunched_resumes_exactly(setup, reference):
    root = setup.folder / "shared"
    run = root / "tiny"

    # A SLURM preemption: SIGTERM to every node's launcher; each forwards it to its worker.
    # Node 1 gets a results root of its own here: whatever its process wrote would be there.
    node1_root = setup.folder / "node1-root"
    nodes = setup.nodes("term", (root, node1_root))
    wait_for(lambda: logged_steps(run)[-1:] >= [10], nodes, "step 10 logged")
    for node in nodes:
        node.signal_launcher(signal.SIGTERM)
    codes = [node.wait(60) for node in nodes]
    # The workers saved and exited 130; accelerate launch exits 128 + SIGTERM.
    assert codes == [128 + signal.SIGTERM] * 2, [node.output[-3000:] for node in nodes]
    stopped = re.search(r"stopped by SIGTERM after step (\d+): saved", nodes[0].output)
    assert stopped, nodes[0].output[-3000:]
    preempted_at = int(stopped.group(1))
    assert 10 <= preempted_at < 40 and saved_step(run) == preempted_at
    # Only global rank 0 wrote, and only it printed the usual lines.
    assert not node1_root.exists() or not any(node1_root.iterdir())
    assert nodes[0].output.count("model: ") == 1
    assert "model: " not in nodes[1].output

    # Relaunch on the shared root; node 1 dies outright once a later checkpoint exists.
    nodes = setup.nodes("kill", (root, root))
    wait_for(lambda: logged_steps(run)[-1:] >= [25], nodes, "step 25 logged")
    nodes[1].kill_node()
    killed = time.monotonic()
    code = nodes[0].wait(60)
    assert time.monotonic() - killed < 60
    nodes[1].wait(10)
    output = nodes[0].output
    # One line from the surviving worker (exit 75); accelerate launch --quiet exits 1.
    assert code == 1, output[-3000:]
    assert re.search(r"exitcode\s*:\s*75\b", output), output[-3000:]
    assert output.count("Error: training stopped") == output.count(PEER_GONE) == 1, output
    assert "Traceback" not in output, output[-3000:]
    resume_step = saved_step(run)
    stopped_after = re.search(r"training stopped after step (\d+): another", output)
    assert stopped_after and int(stopped_after.group(1)) >= 25, output[-3000:]
    assert f"to resume from step {resume_step} (" in output
    assert preempted_at < resume_step < 40

    # Relaunch both: the two-node run ends as the single-node run did, uninterrupted.
    nodes = setup.nodes("resume", (root, root), pace="0")
    codes = [node.wait(300) for node in nodes]
    assert codes == [0, 0], [node.output[-3000:] for node in nodes]
    assert f"resuming from step {resume_step}" in nodes[0].output
    assert computed(run) == reference


def test_a_hung_node_ends_the_run_after_the_distributed_timeout(setup, reference):
    """SIGSTOP: the peer's sockets stay open, so only the process group's timeout tells."""
    # (`reference` only so that the shared data is prepared before the nodes start.)
    root = setup.folder / "hang"
    nodes = setup.nodes("hang", (root, root), "--set", "train.distributed_timeout_s=5")
    wait_for(lambda: logged_steps(root / "tiny")[-1:] >= [10], nodes, "step 10 logged")
    nodes[1].kill_node(signal.SIGSTOP)
    try:
        code = nodes[0].wait(60)
    finally:
        nodes[1].kill_node()
        nodes[1].wait(10)
    output = nodes[0].output
    assert code == 1, output[-3000:]
    assert re.search(r"exitcode\s*:\s*75\b", output), output[-3000:]
    line = "another process did not answer within train.distributed_timeout_s = 5 s"
    assert output.count("Error: training stopped") == output.count(line) == 1, output
    assert "Traceback" not in output, output[-3000:]
