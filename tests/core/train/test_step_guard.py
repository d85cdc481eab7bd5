"""Guards for long runs: skipped steps (NaN, spikes, fp16 overflows), the stop, exact resume.

The losses are corrupted by ``fault_plugin.py``'s ``faulty_loss`` callback (a
forward hook that multiplies chosen steps' losses by NaN or 1000), in this
process for the runs and through the installed plugin for the CLI.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from fault_plugin import LossFault, NoOptions
from test_distributed import PROBE, launch
from test_fault_injection import Gpt, install

from nanogpt_core import Callback, hookimpl
from nanogpt_core.errors import TrainingError
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.checkpoints import load_checkpoint, save_checkpoint
from nanogpt_core.train.step_guard import StepGuard, agree
from nanogpt_core.train.stopping import TrainingInterrupted

NAN, INF = float("nan"), float("inf")


def sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def test_non_finite_steps_are_always_skipped_and_spikes_once_the_window_is_full():
    guard = StepGuard(sgd(), spike_factor=3.0, spike_window=4)
    assert guard.judge(NAN, 1.0) == "loss nan, gradient norm 1: not finite"
    assert guard.judge(2.0, INF) == "loss 2, gradient norm inf: not finite"
    applied = []
    for step, loss in enumerate([2.0, 2.2, 1.8, 2.0], start=1):
        assert guard.judge(100.0, 100.0) is None  # too little history to call anything a spike
        assert guard.step(step, loss, 1.0, lambda: applied.append(1)) is None
    assert len(applied) == 4
    # The median of the last four accepted losses is 2.0, of the norms 1.0.
    assert guard.judge(6.0, 3.0) is None
    assert guard.judge(6.1, 1.0) == "loss 6.1 is above 3 x the median 2 of the last 4 steps"
    assert guard.judge(2.0, 3.5) == (
        "gradient norm 3.5 is above 3 x the median 1 of the last 4 steps"
    )
    line = guard.step(5, 2.0, 3.5, lambda: applied.append(1))
    assert line == (
        "step 5: skipped (gradient norm 3.5 is above 3 x the median 1 of the last 4 steps); "
        "1 skipped so far"
    )
    assert len(applied) == 4 and len(guard.window) == 4  # a skipped step joins no window
    assert guard.state_dict() == {
        "window": [[2.0, 1.0], [2.2, 1.0], [1.8, 1.0], [2.0, 1.0]],
        "skipped": 1,
        "in_a_row": 1,
    }


def test_too_many_skips_in_a_row_stop_naming_the_step_and_the_checkpoint():
    guard = StepGuard(
        sgd(),
        max_skips_in_a_row=3,
        last_good=lambda: "The last good checkpoint is step 4 (last.pth).",
        learning_rate=6e-4,
    )
    guard.step(5, NAN, 1.0, lambda: None)
    guard.step(6, NAN, 1.0, lambda: None)
    assert guard.step(7, 2.0, 1.0, lambda: None) is None  # an applied step ends the run of skips
    guard.step(8, NAN, 1.0, lambda: None)
    guard.step(9, 2.0, INF, lambda: None)
    with pytest.raises(TrainingError) as info:
        guard.step(10, NAN, NAN, lambda: None)
    assert str(info.value) == (
        "step 10: 3 steps skipped in a row (the last: loss nan, gradient norm nan: not finite); "
        "training diverged and nothing was saved from these steps. The last good checkpoint is "
        "step 4 (last.pth). Resume it with a lower learning rate: gpt run <experiment> "
        "--set train.learning_rate=0.0003"
    )
    assert guard.skipped == 5


def test_a_skip_leaves_the_weights_the_optimizer_and_the_fp16_scaler_consistent():
    """With ``torch.amp.GradScaler("cpu")``: what Accelerate builds for fp16 on a GPU."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = StepGuard(optimizer, scaler, spike_factor=3.0, spike_window=2)

    def step(n: int, corrupt: float = 1.0) -> str | None:
        loss = model(torch.randn(8, 4)).square().mean() * corrupt
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # as Accelerate's clip_grad_norm_ does under fp16
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

        def optimizer_step() -> None:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        return guard.step(n, loss.item(), norm.item(), optimizer_step)

    assert step(1) is None and step(2) is None
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    assert "skipped (loss inf" in step(3, corrupt=INF)  # an overflow: the scale backs off
    assert scaler.get_scale() == 512.0
    assert "skipped (loss" in step(4, corrupt=1000.0)  # a spike: the scale stays
    assert scaler.get_scale() == 512.0
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    assert all(p.grad is None for p in model.parameters())
    after = optimizer.state_dict()["state"]
    for key, saved in state["state"].items():
        for name, value in saved.items():
            assert torch.equal(after[key][name], value), (key, name)
    # The scaler's bookkeeping was closed: the next step unscales and applies as usual.
    assert step(5) is None
    assert not torch.equal(model.weight, weights["weight"])
    assert guard.skipped == 2 and guard.in_a_row == 0


def test_the_scalers_own_skip_is_counted_like_the_guards():
    class Overflowed:
        """Accelerate's wrapped optimizer after its scaler skipped the step."""

        step_was_skipped = True

    guard = StepGuard(Overflowed())
    assert guard.step(7, 2.0, 1.0, lambda: None) == (
        "step 7: skipped (the fp16 loss scaler found an overflow); 1 skipped so far"
    )
    assert guard.in_a_row == 1 and not guard.window


class OneOfTwoProcesses:
    """``gather`` as Accelerate's under two processes: this one's row, then the other's."""

    def __init__(self, other: list[float]) -> None:
        self.other = torch.tensor(other)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, self.other[None, :]])


@pytest.mark.parametrize(
    ("mine", "theirs"),
    [((2.0, 1.0), (NAN, 1.0)), ((2.0, 1.0), (2.0, INF)), ((2.0, 1.0), (2.2, 9.0))],
    ids=["nan-loss-elsewhere", "inf-norm-elsewhere", "spike-elsewhere"],
)
def test_every_process_decides_alike_from_the_gathered_figures(mine, theirs):
    decisions = []
    for own, other in [(mine, theirs), (theirs, mine)]:
        guard = StepGuard(sgd(), spike_factor=3.0, spike_window=2)
        guard.load_state_dict({"window": [[2.0, 1.0], [2.0, 1.0]]})
        loss, norm, stop = agree(
            OneOfTwoProcesses([*other, 0.0]), torch.tensor(own[0]), torch.tensor(own[1]), stop=False
        )
        assert not stop
        decisions.append(guard.judge(loss, norm))
    assert decisions[0] is not None and decisions[0] == decisions[1]


@pytest.mark.parametrize("value", ["0.5", "1.0", "-2.0"])
def test_a_spike_factor_that_would_skip_healthy_steps_is_refused(tiny_char_experiment, value):
    from nanogpt_core.config.experiment_file import load_experiment
    from nanogpt_core.errors import ConfigError

    path = tiny_char_experiment()
    with pytest.raises(ConfigError) as info:
        load_experiment(path, [f"train.spike_factor={value}"], load_plugins(disabled=()))
    assert str(info.value).endswith(
        f"train.spike_factor: {float(value)} would skip healthy steps; use 0 (off) or a "
        "factor above 1"
    )


# -- real runs -----------------------------------------------------------------

GUARDED = [
    "train.steps_per_epoch=16",
    "train.log_every=1",
    "train.eval_every=8",
    "train.eval_batches=1",
    "train.save_every=2",
    "train.spike_factor=3",
    "train.spike_window=4",
]
# Step 3: NaN (skipped with any history); 9 and 12: 1000 times the loss (spikes).
FAULTS = "3:nan,9:huge,12:huge"
EXTRA = '[[callbacks]]\nplugin = "faulty_loss"\n[[callbacks]]\nplugin = "stop_at"\n'


class StopAt(Callback):
    """Sends this process SIGTERM after a chosen step: the run saves and stops there."""

    step: int | None = None

    def on_step_end(self, state) -> None:
        if state.step == StopAt.step:
            os.kill(os.getpid(), signal.SIGTERM)


def guarded_plugins():
    class Faults:
        @hookimpl
        def register_callbacks(self, register):
            register("faulty_loss", LossFault, options=NoOptions)
            register("stop_at", lambda options: StopAt(), options=NoOptions)

    plugins = load_plugins(disabled=())
    plugins.register(Faults(), name="faults")
    return plugins


def lines_without_timing(path):
    timing = ("elapsed_s", "tokens_per_sec", "mfu")
    return [
        {k: v for k, v in json.loads(line).items() if k not in timing}
        for line in path.read_text().splitlines()
    ]


def test_skipped_steps_are_counted_and_a_run_stopped_after_them_resumes_exactly(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment, monkeypatch, capsys
):
    monkeypatch.setenv("NANOGPT_LOSS_FAULT", FAULTS)
    path = tiny_char_experiment(extra=EXTRA)
    plugins = guarded_plugins()
    StopAt.step = None
    whole = train_experiment(path, session_data_dir, tmp_path / "a", GUARDED, plugins)
    out = capsys.readouterr().out
    assert "step 3: skipped (loss nan, gradient norm nan: not finite); 1 skipped so far" in out
    assert "step 9: skipped (loss " in out and "2 skipped so far" in out
    assert "step 12: skipped (loss " in out and "3 skipped so far" in out
    lines = lines_without_timing(tmp_path / "a" / "tiny" / "metrics.jsonl")
    assert [line["skipped_steps"] for line in lines] == [0, 0] + [1] * 6 + [2] * 3 + [3] * 5
    assert lines[2]["train_loss"] is None and lines[2]["grad_norm"] is None  # strict JSON
    assert lines[8]["train_loss"] > 1000  # the spike, as measured
    assert whole["skipped_steps"] == 3 and math.isfinite(whole["val_loss"])

    # Stopped after step 10, between the spikes: the window must survive the resume,
    # or step 12 (two steps later) would find too little history to be called a spike.
    StopAt.step = 10
    with pytest.raises(TrainingInterrupted):
        train_experiment(path, session_data_dir, tmp_path / "b", GUARDED, plugins)
    saved = load_checkpoint(tmp_path / "b" / "tiny" / "checkpoints" / "last.pth", resume=True)
    assert saved["step"] == 10
    assert saved["guards"]["skipped"] == 2 and len(saved["guards"]["window"]) == 4
    StopAt.step = None
    resumed = train_experiment(path, session_data_dir, tmp_path / "b", GUARDED, plugins)
    assert lines_without_timing(tmp_path / "b" / "tiny" / "metrics.jsonl") == lines
    assert {k: v for k, v in resumed.items() if k not in ("elapsed_s", "tokens_per_sec")} == {
        k: v for k, v in whole.items() if k not in ("elapsed_s", "tokens_per_sec")
    }


def test_a_checkpoint_from_before_the_guards_resumes_with_an_empty_window(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment()
    short = ["train.steps_per_epoch=4", "train.eval_every=4", "train.eval_batches=1"]
    train_experiment(path, session_data_dir, tmp_path / "r", short)
    last = tmp_path / "r" / "tiny" / "checkpoints" / "last.pth"
    checkpoint = torch.load(last, weights_only=True)
    guards = checkpoint.pop("guards")
    assert len(guards["window"]) == 4 and guards["skipped"] == guards["in_a_row"] == 0
    save_checkpoint(last, checkpoint)  # as an older version wrote it (checksum recomputed)
    final = train_experiment(path, session_data_dir, tmp_path / "r", ["train.epochs=2", *short])
    assert final["skipped_steps"] == 0
    # The window starts empty: steps 5 to 8 only.
    assert len(load_checkpoint(last, resume=True)["guards"]["window"]) == 4


@pytest.mark.slow
def test_the_cli_stops_a_diverged_run_with_one_line_and_it_resumes_with_a_lower_rate(
    tiny_char_experiment, session_data_dir, tmp_path
):
    """Exit 1 naming the step; the last good checkpoint stays; ``--set`` a lower rate resumes."""
    gpt = Gpt(install(tmp_path / "site"))
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "faulty_loss"\n')
    last = tmp_path / "results" / "tiny" / "checkpoints" / "last.pth"
    common = ["run", str(path), "--data-dir", str(session_data_dir)]
    sets = ["--set", "train.steps_per_epoch=12", "--set", "train.save_every=4"]
    sets += ["--set", "train.max_skips_in_a_row=3", "--set", "train.eval_batches=1"]
    env = {**gpt.env, "NANOGPT_LOSS_FAULT": "6:nan,7:nan,8:nan"}
    result = subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *common, *sets],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: step 8: 3 steps skipped in a row (the last: loss nan, gradient norm nan: not "
        "finite); training diverged and nothing was saved from these steps. The last good "
        f"checkpoint is step 4 ({last.relative_to(tmp_path)}). Resume it with a lower learning "
        "rate: gpt run <experiment> --set train.learning_rate=0.0015"
    )
    assert load_checkpoint(last, resume=True)["step"] == 4
    resumed = gpt(*common, *sets, "--set", "train.learning_rate=1.5e-3", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 4 (epoch 1)" in resumed.stdout
    assert load_checkpoint(last, resume=True)["step"] == 12


@pytest.mark.slow
def test_every_process_skips_the_steps_one_process_spoiled(
    tiny_char_experiment, session_data_dir, tmp_path
):
    """Two processes (DDP, gloo); process 1's losses alone are corrupted: both skip alike."""
    site = install(tmp_path / "site")
    env = {
        **Gpt(site).env,
        "NANOGPT_LOSS_FAULT": "4:nan,9:huge",
        "NANOGPT_LOSS_FAULT_RANK": "1",
    }
    results, probe = tmp_path / "results", tmp_path / "probe"
    callbacks = 'callbacks=[{plugin = "probe"}, {plugin = "faulty_loss"}]'
    sets = ["train.steps_per_epoch=12", "train.log_every=1", "train.eval_every=12"]
    sets += ["train.eval_batches=1", "train.spike_factor=3", "train.spike_window=4"]
    experiment = tiny_char_experiment(name="ddp")
    command = launch(PROBE, str(experiment), str(results), str(session_data_dir), str(probe))
    done = subprocess.run(
        [*command, callbacks, *sets], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["end_step"], r["status"]) for r in ranks] == [(12, "completed")] * 2
    # Had one process stepped where the other skipped, their weights would differ now.
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    lines = [json.loads(x) for x in (results / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [line["skipped_steps"] for line in lines] == [0] * 3 + [1] * 5 + [2] * 4
    assert done.stdout.count("step 4: skipped (loss nan") == 1  # printed once, by process 0
    assert "step 9: skipped (loss " in done.stdout
