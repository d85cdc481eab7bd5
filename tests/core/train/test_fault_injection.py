"""Fault injection: a plugin of every kind raises in each of its methods in turn.

``fault_plugin.py`` is installed as a third-party distribution (a module and its
``*.dist-info`` on PYTHONPATH, found by ``importlib.metadata`` as a pip-installed
one is) and ``NANOGPT_FAULT=<kind>.<method>`` picks the method that raises. Each
case runs the real ``gpt`` command in a subprocess and checks what a user sees
(exit status, one ``Error:`` line naming the plugin and the method, no
traceback) and what is left on disk (no half-written data, the previous
``last.pth`` still there and loadable).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt_core.train.checkpoints import load_checkpoint

HERE = Path(__file__).resolve().parent
TEMP_MARK = ".tmp-"

TEXT_EXPERIMENT = """
name = "text"
[dataset]
plugin = "faulty_text"
path = "{path}"
[model]
n_layer = 1
n_head = 1
n_embd = 16
block_size = 16
[train]
batch_size = 4
steps_per_epoch = 3
warmup_steps = 1
eval_every = 3
eval_batches = 1
log_every = 3
optimizer = "faulty_opt"
schedule = "faulty_sched"
[[callbacks]]
plugin = "faulty_cb"
"""

SUMS_EXPERIMENT = """
name = "sums"
[dataset]
plugin = "faulty_sums"
[model]
n_layer = 1
n_head = 1
n_embd = 16
block_size = 32
[train]
batch_size = 4
steps_per_epoch = 3
warmup_steps = 1
eval_every = 3
eval_batches = 1
log_every = 3
"""


def install(site: Path) -> Path:
    """``fault_plugin.py`` as the distribution ``nanogpt-faulty`` (module and entry point ``faulty``)."""
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "fault_plugin.py", site / "faulty.py")
    info = site / "nanogpt_faulty-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nanogpt-faulty\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[nanogpt]\nfaulty = faulty\n")
    return site


class Gpt:
    """Runs ``python -m nanogpt_core`` with the faulty plugin installed."""

    def __init__(self, site: Path) -> None:
        # Ahead of what is on the path already, so the checkout under test stays the one imported.
        path = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}

    def __call__(
        self, *args: str, cwd: Path, fault: str | None = None, stdin: str | None = None
    ) -> subprocess.CompletedProcess:
        env = {**self.env, "NANOGPT_FAULT": fault or ""}
        return subprocess.run(
            [sys.executable, "-m", "nanogpt_core", *args],
            cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=300,
        )  # fmt: skip


def assert_contained(result: subprocess.CompletedProcess, who: str, method: str) -> None:
    """Exit 1 and one line: ``Error: <who> ... failed in <method>: RuntimeError: injected ...``."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0] == result.stderr.strip().splitlines()[-1]
    assert who in errors[0] and f"failed in {method}: RuntimeError: injected fault" in errors[0]


def method_of(fault: str) -> str:
    """The method a message names for ``<kind>.<method>``: a factory is "its factory"."""
    method = fault.split(".")[1]
    return "its factory" if method == "factory" else method


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(f"*{TEMP_MARK}*")] if folder.exists() else []


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, shared_data_module) -> dict:
    """The plugin installed, both experiments written, and each trained once for 3 steps."""
    root = tmp_path_factory.mktemp("faulty")
    gpt = Gpt(install(root / "site"))
    text = shared_data_module / "tinyshakespeare" / "input.txt"
    (root / "text.toml").write_text(TEXT_EXPERIMENT.format(path=text))
    (root / "sums.toml").write_text(SUMS_EXPERIMENT)
    for name in ("text", "sums"):
        done = gpt("run", f"{name}.toml", cwd=root)
        assert done.returncode == 0, done.stderr
    return {"root": root, "gpt": gpt}


@pytest.fixture(scope="module")
def shared_data_module() -> Path:
    """The real data samples (the conftest fixture is function-scoped)."""
    from conftest import SHARED_DATA  # the tests' own conftest, as test_compare.py does

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    return SHARED_DATA


def run_folder(faulty: dict, tmp_path: Path) -> Path:
    """A copy of the trained text run (data and results, last.pth at step 3) to resume in."""
    for name in ("data", "results"):
        shutil.copytree(faulty["root"] / name, tmp_path / name)
    shutil.copy(faulty["root"] / "text.toml", tmp_path)
    return tmp_path / "results" / "text" / "checkpoints" / "last.pth"


# Resuming the 3-step run for 6 steps, each method raising in turn; (who, fault).
RUN_FAULTS = [
    ("optimizer 'faulty_opt'", "optimizer.factory"),
    ("optimizer 'faulty_opt'", "optimizer.build"),
    ("optimizer 'faulty_opt'", "optimizer.step"),
    ("optimizer 'faulty_opt'", "optimizer.zero_grad"),
    ("optimizer 'faulty_opt'", "optimizer.state_dict"),
    ("optimizer 'faulty_opt'", "optimizer.load_state_dict"),
    ("schedule 'faulty_sched'", "schedule.factory"),
    ("schedule 'faulty_sched'", "schedule.lr"),
    ("callback 'faulty_cb' (callbacks[0])", "callback.factory"),
    ("callback 'faulty_cb' (callbacks[0])", "callback.load_state_dict"),
    ("callback 'faulty_cb' (callbacks[0])", "callback.on_train_start"),
    ("callback 'faulty_cb' (callbacks[0])", "callback.on_step_end"),
    ("callback 'faulty_cb' (callbacks[0])", "callback.on_metrics"),
    ("callback 'faulty_cb' (callbacks[0])", "callback.on_eval_end"),
    ("callback 'faulty_cb' (callbacks[0])", "callback.on_epoch_end"),
    ("callback 'faulty_cb' (callbacks[0])", "callback.state_dict"),
]
QUICK = {"optimizer.step", "callback.load_state_dict"}


@pytest.mark.parametrize(
    ("who", "fault"),
    [
        pytest.param(*case, marks=() if case[1] in QUICK else pytest.mark.slow, id=case[1])
        for case in RUN_FAULTS
    ],
)
def test_a_fault_while_training_is_one_line_and_the_last_checkpoint_stays(
    faulty, tmp_path, who, fault
):
    last = run_folder(faulty, tmp_path)
    before = digest(last)
    result = faulty["gpt"](
        "run", "text.toml", "--set", "train.steps_per_epoch=6", cwd=tmp_path, fault=fault
    )
    assert_contained(result, who, method_of(fault))
    assert digest(last) == before  # nothing saved from the failed run, the old file untouched
    assert load_checkpoint(last, resume=True)["step"] == 3
    assert not temporaries(last.parent)
    if fault in QUICK:  # --debug shows what the one line hides
        debug = faulty["gpt"](
            "--debug", "run", "text.toml", "--set", "train.steps_per_epoch=6", cwd=tmp_path,
            fault=fault,
        )  # fmt: skip
        assert debug.returncode == 1 and "Traceback" in debug.stderr
        assert f"RuntimeError: injected fault in {fault}" in debug.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["callback.on_checkpoint", "callback.on_train_end"])
def test_a_fault_after_a_save_leaves_that_checkpoint_whole(faulty, tmp_path, fault):
    last = run_folder(faulty, tmp_path)
    result = faulty["gpt"](
        "run", "text.toml", "--set", "train.steps_per_epoch=6", cwd=tmp_path, fault=fault
    )
    assert_contained(result, "callback 'faulty_cb' (callbacks[0])", fault.split(".")[1])
    assert load_checkpoint(last, resume=True)["step"] == 6  # written before the hook ran
    assert not temporaries(last.parent)


def test_a_callback_state_that_is_not_plain_data_stops_the_save_naming_it(faulty, tmp_path):
    last = run_folder(faulty, tmp_path)
    before = digest(last)
    result = faulty["gpt"](
        "run", "text.toml", "--set", "train.steps_per_epoch=6", cwd=tmp_path,
        fault="callback.unplain_state",
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: callback 'faulty_cb' (callbacks[0]): state_dict()['steps'] is a numpy.float64; "
        "a checkpoint holds only plain data (numbers, strings, bools, None, lists, tuples, "
        "dicts with string keys, tensors), so nothing was saved"
    )
    assert digest(last) == before
    assert load_checkpoint(last, resume=True)["step"] == 3
    assert not temporaries(last.parent)


# Preparing data, each method raising in turn; (experiment, who, fault).
PREPARE_FAULTS = [
    ("text", "dataset 'faulty_text' (plugin 'faulty')", "dataset.factory"),
    ("text", "dataset 'faulty_text' (plugin 'faulty')", "dataset.documents"),
    ("text", "tokenizer 'faulty_tok' (plugin 'faulty')", "tokenizer.factory"),
    ("text", "tokenizer 'faulty_tok' (plugin 'faulty')", "tokenizer.learn"),
    ("text", "tokenizer 'faulty_tok' (plugin 'faulty')", "tokenizer.encode"),
    ("text", "tokenizer 'faulty_tok' (plugin 'faulty')", "tokenizer.description"),
    ("sums", "dataset 'faulty_sums' (plugin 'faulty')", "dataset.examples"),
    ("sums", "template 'faulty_tpl' (plugin 'faulty')", "template.factory"),
    ("sums", "template 'faulty_tpl' (plugin 'faulty')", "template.description"),
    ("sums", "template 'faulty_tpl' (plugin 'faulty')", "template.prompt"),
    ("sums", "tokenizer 'faulty_tok' (plugin 'faulty')", "tokenizer.encode"),
]


@pytest.mark.parametrize(
    ("experiment", "who", "fault"),
    [
        pytest.param(
            *case,
            marks=() if case[2] == "template.prompt" else pytest.mark.slow,
            id=f"{case[0]}-{case[2]}",
        )
        for case in PREPARE_FAULTS
    ],
)
def test_a_fault_while_preparing_is_one_line_and_publishes_nothing(
    faulty, tmp_path, experiment, who, fault
):
    shutil.copy(faulty["root"] / f"{experiment}.toml", tmp_path)
    result = faulty["gpt"]("prepare", f"{experiment}.toml", cwd=tmp_path, fault=fault)
    assert_contained(result, who, method_of(fault))
    data = tmp_path / "data"
    left = [p.name for p in data.rglob("*") if p.is_file()] if data.exists() else []
    assert not [name for name in left if not name.endswith(".lock")], left
    assert not temporaries(data)


def sums_checkpoint(faulty: dict) -> str:
    return str(faulty["root"] / "results" / "sums" / "checkpoints" / "last.pth")


# Using a checkpoint: (who, fault, command line); "{ckpt}" is the fine-tuned sums checkpoint.
USE_FAULTS = [
    ("template 'faulty_tpl' (plugin 'faulty')", "template.prompt", "chat --once"),
    ("template 'faulty_tpl'", "template.from_description", "chat --once"),
    ("tokenizer 'faulty_tok' (plugin 'faulty')", "tokenizer.encode", "chat --once"),
    ("tokenizer 'faulty_tok' (plugin 'faulty')", "tokenizer.decode", "chat --once"),
    ("template 'faulty_tpl' (plugin 'faulty')", "template.prompt", "chat"),
    ("tokenizer 'faulty_tok'", "tokenizer.from_description", "sample"),
    ("tokenizer 'faulty_tok' (plugin 'faulty')", "tokenizer.encode", "sample"),
    ("tokenizer 'faulty_tok' (plugin 'faulty')", "tokenizer.decode", "sample"),
    ("template 'faulty_tpl' (plugin 'faulty')", "template.chat_template", "export"),
    ("eval task 'faulty_eval'", "eval_task.factory", "eval"),
    ("eval task 'faulty_eval'", "eval_task.evaluate", "eval"),
]
USE_ARGS = {
    "chat --once": ["chat", "--ckpt", "{ckpt}", "--once", "3 plus 3", "--max-new-tokens", "4"],
    "chat": ["chat", "--ckpt", "{ckpt}", "--max-new-tokens", "4"],
    "sample": ["sample", "--ckpt", "{ckpt}", "--prompt", "Q: 3", "--max-new-tokens", "4"],
    "export": ["export", "--ckpt", "{ckpt}", "--out", "exported"],
    "eval": ["eval", "--ckpt", "{ckpt}", "--task", "faulty_eval"],
}


@pytest.mark.parametrize(
    ("who", "fault", "command"),
    [
        pytest.param(
            *case,
            marks=() if case[1:] == ("template.prompt", "chat --once") else pytest.mark.slow,
            id=f"{case[2]}-{case[1]}",
        )
        for case in USE_FAULTS
    ],
)
def test_a_fault_while_using_a_checkpoint_is_one_line(faulty, tmp_path, who, fault, command):
    args = [arg.format(ckpt=sums_checkpoint(faulty)) for arg in USE_ARGS[command]]
    # Without --once, gpt chat reads questions from stdin, one a line.
    result = faulty["gpt"](*args, cwd=tmp_path, fault=fault, stdin="3 plus 3\n4 plus 4\n")
    assert_contained(result, who, method_of(fault))
    assert not (tmp_path / "exported").exists()
    if command in ("chat --once", "chat"):
        ok = faulty["gpt"](*args, cwd=tmp_path, stdin="3 plus 3\n")
        assert ok.returncode == 0, ok.stderr  # the same command works without the fault


@pytest.mark.slow
def test_a_plugin_command_that_raises_is_one_line_naming_it(faulty, tmp_path):
    result = faulty["gpt"]("faulty", cwd=tmp_path, fault="command.callback")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: command plugin 'faulty' failed: RuntimeError: injected fault in command.callback"
    ]
    assert faulty["gpt"]("faulty", cwd=tmp_path).stdout == "no fault\n"


def serve_and_ask(faulty: dict, fault: str, stream: bool) -> tuple[int, str, str]:
    """Start ``gpt serve`` with ``fault``, ask one chat question: (status, body, server stderr)."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["serve", "--ckpt", sums_checkpoint(faulty), "--port", str(port), "--device", "cpu"]
    env = {**faulty["gpt"].env, "NANOGPT_FAULT": fault}
    server = subprocess.Popen(
        [sys.executable, "-m", "nanogpt_core", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"messages": [{"role": "user", "content": "3 plus 3"}], "max_tokens": 4}
        answer = httpx.post(
            f"{url}/v1/chat/completions", json={**body, "stream": stream}, timeout=60
        )
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200  # still serving
    finally:
        server.kill()
        _, stderr = server.communicate(timeout=30)
    return answer.status_code, answer.text, stderr


@pytest.mark.slow
def test_gpt_serve_answers_a_template_fault_with_a_500_naming_it(faulty):
    status, body, stderr = serve_and_ask(faulty, "template.prompt", stream=False)
    line = "template 'faulty_tpl' (plugin 'faulty') failed in prompt: RuntimeError: injected fault"
    assert status == 500 and line in body and '"server_error"' in body
    assert f"Error: {line}" in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_gpt_serve_ends_a_stream_with_the_fault_as_its_last_event(faulty):
    status, body, stderr = serve_and_ask(faulty, "tokenizer.decode", stream=True)
    line = "tokenizer 'faulty_tok' (plugin 'faulty') failed in decode: RuntimeError: injected"
    events = [e for e in body.split("\n\n") if e.startswith("data: ")]
    assert status == 200 and line in events[-1] and '"error"' in events[-1]
    assert f"Error: {line}" in stderr and "Traceback" not in stderr


def test_plain_data_is_what_a_checkpoint_loads_back_and_the_problem_names_its_place():
    import collections

    import numpy as np
    import torch

    from nanogpt_core.train.checkpoints import plain_data_problem

    plain = {
        "n": 1, "x": 0.5, "ok": True, "none": None, "s": "a", "t": torch.ones(2),
        "nested": [(1, 2), {"k": [torch.nn.Parameter(torch.zeros(1))]}],
        "ordered": collections.OrderedDict(a=1), "by_int": {3: "three"},
    }  # fmt: skip
    assert plain_data_problem(plain, "state") is None
    assert plain_data_problem({"a": [1, np.int64(2)]}, "state") == "state['a'][1] is a numpy.int64"
    assert plain_data_problem({"a": {1, 2}}, "state") == "state['a'] is a set"
    assert plain_data_problem({(1, 2): 0}, "state") == (
        "state has the key (1, 2), a tuple, not a string"
    )
    cycle: list = []
    cycle.append(cycle)
    assert "nests deeper than" in plain_data_problem(cycle, "state")


def test_only_a_raise_inside_the_optimizer_is_blamed_on_its_plugin():
    import torch

    from nanogpt_core.errors import PluginFault
    from nanogpt_core.train.optimization import prepare_contained

    class Broken(torch.optim.SGD):
        def state_dict(self):
            raise KeyError("lr")

    class Accelerator:  # as Accelerate's prepare does: it asks the optimizer for its state
        def prepare(self, model, optimizer):
            optimizer.state_dict()
            return model, optimizer

    class OwnBug:
        def prepare(self, model, optimizer):
            raise ValueError("accelerate's own")

    model = torch.nn.Linear(2, 2)
    broken = Broken(model.parameters(), lr=0.1)
    with pytest.raises(PluginFault) as fault:
        prepare_contained(Accelerator(), model, broken, "plugin 'p': optimizer 'o'")
    assert str(fault.value) == "plugin 'p': optimizer 'o' failed in state_dict: KeyError: 'lr'"
    with pytest.raises(ValueError, match="accelerate's own"):
        prepare_contained(OwnBug(), model, broken, "plugin 'p': optimizer 'o'")
