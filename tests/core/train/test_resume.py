"""The core owns checkpoint and resume: what is saved, what is checked, what is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
import torch

from nanogpt_core import Callback, TrainerState, hookimpl
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.checkpointing import load_optimizer_state
from nanogpt_core.train.checkpoints import CheckpointError, load_checkpoint, save_checkpoint

SHORT = ["train.steps_per_epoch=4", "train.eval_every=4", "train.eval_batches=1"]
CHECKPOINT = '[[callbacks]]\nplugin = "checkpoint"\n'


def gpt(*args, cwd, env=None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert lines and lines[-1].startswith("Error: "), result.stderr
    return lines[-1]


class Counter(Callback):
    """A callback with state: how many steps it has seen."""

    def __init__(self):
        self.seen = 0

    def on_step_end(self, state):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def counting_plugins(seen_at_start: list | None = None):
    class Counting:
        @hookimpl
        def register_callbacks(self, register):
            def make(options):
                counter = Counter()
                if seen_at_start is not None:
                    original = counter.on_step_end

                    def first(state, _original=original):
                        if not seen_at_start:
                            seen_at_start.append(counter.seen)
                        _original(state)

                    counter.on_step_end = first
                return counter

            register("counter", make)
            register("other", lambda options: Counter())

    plugins = load_plugins(disabled=())
    plugins.register(Counting(), name="counting")
    return plugins


def test_trainer_state_is_read_only_apart_from_its_requests(tmp_path):
    from nanogpt_core import RunPaths

    config = load_experiment_stub(tmp_path)
    state = TrainerState(config=config, paths=RunPaths(tmp_path), metrics={"a": 1.0})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        state.step = 5
    with pytest.raises(TypeError):
        state.metrics["a"] = 2.0
    state.request_save("last.pth")
    state.add_text("tag", "text")
    with pytest.raises(ValueError, match=r"plain file name ending in \.pth"):
        state.request_save("../escape.pth")


def load_experiment_stub(tmp_path: Path):
    path = tmp_path / "stub.toml"
    path.write_text('[dataset]\nplugin = "shakespeare"\n')
    return load_experiment(path)


def test_resume_does_not_depend_on_callback_order(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    # The checkpoint plugin listed *last*: the core still restores before any hook runs.
    seen = []
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "counter"\n' + CHECKPOINT)
    train_experiment(path, session_data_dir, tmp_path / "r", SHORT, counting_plugins())
    train_experiment(
        path, session_data_dir, tmp_path / "r", [*SHORT, "train.epochs=2"], counting_plugins(seen)
    )
    assert seen == [4]  # the counter's state came back before its first hook
    saved = load_checkpoint(tmp_path / "r" / "tiny" / "checkpoints" / "last.pth", resume=True)
    assert saved["callbacks"] == [
        {"position": 0, "plugin": "counter", "state": {"seen": 8}},
        {"position": 1, "plugin": "checkpoint", "state": {}},
    ]


def test_reordered_callbacks_with_state_are_refused_with_a_clear_message(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "counter"\n' + CHECKPOINT)
    train_experiment(path, session_data_dir, tmp_path / "r", SHORT, counting_plugins())
    checkpoint = tmp_path / "r" / "tiny" / "checkpoints" / "last.pth"
    # Same experiment otherwise: rewrite config.json so only the checkpoint can object.
    reordered = tiny_char_experiment(
        name="tiny", extra=CHECKPOINT + '[[callbacks]]\nplugin = "counter"\n'
    )
    config_json = tmp_path / "r" / "tiny" / "config.json"
    config_json.unlink()
    with pytest.raises(Exception) as info:
        train_experiment(
            reordered,
            session_data_dir,
            tmp_path / "r",
            [*SHORT, "train.epochs=2"],
            counting_plugins(),
        )
    assert str(info.value) == (
        f"{checkpoint} holds the state of callbacks[0] = 'counter', but the experiment's "
        "callbacks[0] is 'checkpoint'; list the callbacks as before, or start over with --fresh"
    )


def test_a_checkpoint_of_another_tokenizer_or_data_is_refused(
    tiny_char_experiment, session_data_dir, tmp_path, shared_data, train_experiment
):
    path = tiny_char_experiment(extra=CHECKPOINT)
    train_experiment(path, session_data_dir, tmp_path / "r", SHORT)
    checkpoint = tmp_path / "r" / "tiny" / "checkpoints" / "last.pth"
    # The same padded vocabulary size (65 -> 128) from a text with one character swapped.
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    edited = tmp_path / "edited.txt"
    edited.write_text(text.replace("Z", "%"))
    other = load_checkpoint(checkpoint, resume=True)
    (tmp_path / "r" / "tiny" / "config.json").unlink()
    result = gpt(
        "run", str(path), "--data-dir", str(tmp_path / "data2"), "--results-dir",
        str(tmp_path / "r"), "--set", f'dataset.path="{edited}"', *[part for o in [*SHORT, "train.epochs=2"] for part in ("--set", o)],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert line.startswith(f"Error: {checkpoint} was made by another experiment")
    assert (
        "the char vocabulary differs (65 characters in the checkpoint, 65 now: new '%', gone 'Z')"
        in line
    )
    assert "dataset fingerprint" in line and "--fresh" in line
    assert load_checkpoint(checkpoint, resume=True)["step"] == other["step"]  # untouched


@pytest.mark.parametrize(
    ("first", "then", "difference"),
    [
        ([], ["train.optimizer=muon"],
         'train.muon: (absent) there, a table now; train.optimizer: "adamw" there, "muon" now'),
        (["train.optimizer=muon"], ["train.optimizer=muon", "train.muon.lr=0.05"],
         "train.muon.lr: 0.02 there, 0.05 now"),
    ],
    ids=["optimizer", "muon-lr"],
)  # fmt: skip
def test_without_config_json_the_checkpoints_own_experiment_is_compared(
    first, then, difference, tiny_char_experiment, session_data_dir, tmp_path
):
    """A results folder that lost config.json: the checkpoint's copy of the experiment decides."""
    path = tiny_char_experiment()
    common = ["--data-dir", str(session_data_dir), "--results-dir", str(tmp_path / "r")]

    def run(*overrides: str):
        sets = [part for o in [*SHORT, *overrides] for part in ("--set", o)]
        return gpt("run", str(path), *common, *sets, cwd=tmp_path)

    assert run(*first).returncode == 0
    checkpoint = tmp_path / "r" / "tiny" / "checkpoints" / "last.pth"
    saved = checkpoint.read_bytes()
    (tmp_path / "r" / "tiny" / "config.json").unlink()
    result = run(*then, "train.epochs=2")
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert line == (
        f"Error: {checkpoint} was made by another experiment ({difference}); "
        "restore the experiment or start over with --fresh"
    )
    assert checkpoint.read_bytes() == saved
    assert run(*first, "train.epochs=2").returncode == 0  # the same experiment resumes


def test_a_flipped_byte_is_refused_in_one_line(char_checkpoint, tmp_path):
    damaged = tmp_path / "damaged.pth"
    data = bytearray(char_checkpoint.read_bytes())
    # Flip a byte in the middle of the largest stored tensor.
    checkpoint = torch.load(char_checkpoint, weights_only=True)
    tensor = max(checkpoint["model"].values(), key=lambda t: t.numel())
    needle = tensor.contiguous().view(-1)[:8].numpy().tobytes()
    offset = bytes(data).index(needle) + 8
    data[offset] ^= 0x01
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(damaged)
    assert str(info.value).startswith(f"{damaged}: ")
    assert "\n" not in str(info.value)
    result = gpt("sample", "--ckpt", str(damaged), "--max-new-tokens", "5", cwd=tmp_path)
    assert result.returncode == 2
    assert one_error_line(result).startswith(f"Error: {damaged}: ")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("model_args"), "missing model_args"),
        (lambda c: c.update(step="12"), "step is str, expected an integer"),
        (lambda c: c["model_args"].pop("n_head"), "model_args lacks n_head"),
        (lambda c: c.update(tokenizer={"chars": "ab"}), "tokenizer: expected a table with"),
        (lambda c: c.update(optimizer=None), "optimizer is NoneType, expected a table"),
        (lambda c: c.pop("ranks"), "missing ranks"),
    ],
)
def test_missing_or_mistyped_keys_are_one_line_for_every_use(
    char_checkpoint, tmp_path, change, message
):
    checkpoint = torch.load(char_checkpoint, weights_only=True)
    change(checkpoint)
    broken = tmp_path / "broken.pth"
    save_checkpoint(broken, checkpoint)  # a valid checksum: only the structure is wrong
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(broken, resume=True)
    if message.startswith(("missing ranks", "optimizer")):
        return  # sampling and export do not need these
    for command in (["sample", "--max-new-tokens", "3"], ["export", "--out", str(tmp_path / "x")]):
        result = gpt(*command, "--ckpt", str(broken), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert message in one_error_line(result)


def test_resuming_at_the_last_step_writes_done_with_the_final_metrics(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment(extra=CHECKPOINT)
    final = train_experiment(path, session_data_dir, tmp_path / "r", SHORT)
    done = tmp_path / "r" / "tiny" / "done"
    done.write_text('{"step": 4, "val_lo')  # damaged: treated as absent
    again = train_experiment(path, session_data_dir, tmp_path / "r", SHORT)
    assert again["val_loss"] == final["val_loss"]
    summary = json.loads(done.read_text())
    assert summary["step"] == 4 and summary["val_loss"] == final["val_loss"]


def test_stale_temporaries_of_dead_writers_go_and_live_ones_stay(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment(extra=CHECKPOINT)
    folder = tmp_path / "r" / "tiny" / "checkpoints"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = folder / f".last.pth.tmp-{dead.pid}"
        live = folder / f".last.pth.tmp-{alive.pid}"
        stale.write_bytes(b"half a checkpoint")
        live.write_bytes(b"someone else's")
        train_experiment(path, session_data_dir, tmp_path / "r", SHORT)
        assert not stale.exists() and live.exists()
    finally:
        alive.kill()
        alive.wait()


class PoisonAt(Callback):
    """Makes the weights NaN after a step, without touching that step's loss."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, state):
        if state.step == self.step:
            with torch.no_grad():
                next(state.model.parameters()).fill_(float("nan"))
            state.request_save("last.pth")


def test_non_finite_weights_are_never_saved_and_the_last_good_step_is_named(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    class Poisoning:
        @hookimpl
        def register_callbacks(self, register):
            register("poison", lambda options: PoisonAt(6))

    plugins = load_plugins(disabled=())
    plugins.register(Poisoning(), name="poisoning")
    extra = (
        '[[callbacks]]\nplugin = "checkpoint"\nevery_steps = 2\n[[callbacks]]\nplugin = "poison"\n'
    )
    path = tiny_char_experiment(extra=extra)
    last = tmp_path / "r" / "tiny" / "checkpoints" / "last.pth"
    from nanogpt_core.errors import TrainingError

    with pytest.raises(TrainingError) as info:
        train_experiment(
            path, session_data_dir, tmp_path / "r", ["train.steps_per_epoch=10"], plugins
        )
    assert "weights became non-finite at step 6" in str(info.value)
    assert f"The last good checkpoint is step 4 ({last})" in str(info.value)
    saved = load_checkpoint(last, resume=True)
    assert saved["step"] == 4
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def wait_for_step_after(metrics: Path, step: int, proc: subprocess.Popen) -> None:
    """Wait until ``metrics`` has a line past ``step`` (the run is training)."""
    deadline = time.monotonic() + 120
    while not any(s > step for s in logged_steps(metrics)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


def logged_steps(metrics: Path) -> list[int]:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    # A line being appended may be torn: only whole lines count.
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def test_a_run_without_the_checkpoint_plugin_saves_on_sigterm_and_resumes(
    tiny_char_experiment, session_data_dir, tmp_path
):
    path = tiny_char_experiment()  # no [[callbacks]] at all
    command = [
        sys.executable, "-m", "nanogpt_core", "run", str(path), "--data-dir", str(session_data_dir),
        "--set", "train.steps_per_epoch=100000", "--set", "train.log_every=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = tmp_path / "results" / "tiny" / "metrics.jsonl"
    last = tmp_path / "results" / "tiny" / "checkpoints" / "last.pth"
    stopped_at = []
    for _ in range(2):  # the same command twice: the second resumes the first
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        wait_for_step_after(metrics, stopped_at[-1] if stopped_at else 0, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        step = load_checkpoint(last, resume=True)["step"]
        assert err.strip().splitlines()[-1] == (
            f"Error: stopped by SIGTERM after step {step}: saved "
            "results/tiny/checkpoints/last.pth; run the same command to resume"
        )
        assert "warning:" not in out  # it saves at every evaluation (eval_every = 20)
        if stopped_at:
            assert f"resuming from step {stopped_at[-1]} (epoch 1)" in out
        stopped_at.append(step)
    assert 0 < stopped_at[0] < stopped_at[1]
    assert logged_steps(metrics) == list(range(1, stopped_at[1] + 1))


def test_resuming_keeps_this_machines_optimizer_kernel(tiny_trainer, tmp_path):
    """A checkpoint from a CPU run (unfused AdamW) resumes fused where this run chose fused."""
    saved_by_cpu = tiny_trainer(tmp_path / "cpu", 10_000)
    saved_by_cpu.train_step()
    state = saved_by_cpu.optimizer.state_dict()
    assert [g.get("fused") for g in state["param_groups"]] in ([None, None], [False, False])
    on_gpu = tiny_trainer(tmp_path / "gpu", 10_000)
    for group in on_gpu.optimizer.param_groups:  # what the adamw plugin chooses on CUDA
        group["fused"] = True
        group["lr"] = 0.5
    load_optimizer_state(on_gpu.optimizer, state)
    assert [g["fused"] for g in on_gpu.optimizer.param_groups] == [True, True]
    # Everything else is the checkpoint's: the update continues exactly.
    assert [g["lr"] for g in on_gpu.optimizer.param_groups] == [
        g["lr"] for g in state["param_groups"]
    ]
    assert on_gpu.optimizer.state_dict()["state"].keys() == state["state"].keys()
