"""Optimizers and schedules as plugin kinds: registration, options tables, the trainer, resume."""

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

from nanogpt_core import Callback, hookimpl, option, positive
from nanogpt_core.cli.plugins_command import plugin_listing
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.errors import NanoGPTError, PluginFault
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.checkpoints import load_checkpoint
from nanogpt_core.train.metrics import read_metrics
from nanogpt_core.train.resume import config_differences

DATASET = '[dataset]\nplugin = "shakespeare"\n'
MUON = ["train.optimizer=muon", "train.warmup_steps=2", "train.eval_batches=1", "train.log_every=1"]


def gpt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )


def lines(results: Path, name: str = "tiny") -> list[tuple]:
    records, torn = read_metrics(results / name / "metrics.jsonl")
    assert torn == 0
    return [(r["step"], r["train_loss"], r.get("val_loss"), r["lr"]) for r in records]


# A third party's optimizer and schedule, registered in-process.


@attrs.frozen(kw_only=True)
class SGDOptions:
    """Options of the toy SGD."""

    momentum: float = option(0.0, "SGD momentum.")
    lr_scale: float = option(
        1.0, "Peak lr of the 1-D tensors, times train.learning_rate.", validator=positive
    )


class SGD:
    """Plain SGD: two groups with their own peaks."""

    def __init__(self, options: SGDOptions) -> None:
        self.options = options

    def build(self, model, train, device_type):
        params = list(model.parameters())
        matrices = [p for p in params if p.dim() >= 2]
        vectors = [p for p in params if p.dim() < 2]
        scaled = train.learning_rate * self.options.lr_scale
        return torch.optim.SGD(
            [{"params": matrices}, {"params": vectors, "lr": scaled, "peak_lr": scaled}],
            lr=train.learning_rate,
            momentum=self.options.momentum,
        )


class Tenth:
    """One AdamW group at a tenth of train.learning_rate, as a Lion plugin would set it."""

    def __init__(self, options) -> None:
        pass

    def build(self, model, train, device_type):
        return torch.optim.AdamW(model.parameters(), lr=train.learning_rate / 10)


class Halving:
    """The peak, halved every step."""

    def __init__(self, options) -> None:
        pass

    def lr(self, step, *, peak, floor, warmup_steps, total_steps):
        return peak / 2**step


class GroupRates(Callback):
    """Records every group's lr after each step, and what the optimizer is."""

    def __init__(self, seen: list) -> None:
        self.seen = seen

    def on_step_end(self, state) -> None:
        optimizer = state.optimizer.optimizer  # inside Accelerate's wrapper
        self.seen.append(
            (
                type(optimizer).__name__,
                [(g["lr"], g.get("momentum")) for g in optimizer.param_groups],
            )
        )


def third_party(seen: list):
    class ThirdParty:
        @hookimpl
        def register_optimizers(self, register):
            register("sgd", SGD, options=SGDOptions)
            register("tenth", Tenth)

        @hookimpl
        def register_schedules(self, register):
            register("halving", Halving, description="Halve every step.")

        @hookimpl
        def register_callbacks(self, register):
            register("rates", lambda options: GroupRates(seen))

    plugins = load_plugins(disabled=())
    assert plugins.register(ThirdParty(), name="third_party")
    return plugins


THIRD_PARTY = """
[train.sgd]
momentum = 0.5
lr_scale = 2.0
[[callbacks]]
plugin = "rates"
"""
FOUR_STEPS = [
    "train.steps_per_epoch=4",
    "train.eval_every=4",
    "train.eval_batches=1",
    "train.log_every=1",
]


def test_register_optimizers_a_third_partys_optimizer_is_built_with_its_options(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    seen: list = []
    plugins = third_party(seen)
    path = tiny_char_experiment(extra=THIRD_PARTY)
    overrides = [*FOUR_STEPS, "train.optimizer=sgd", "train.schedule=halving"]
    train_experiment(path, session_data_dir, tmp_path / "r", overrides, plugins)
    names = {name for name, _ in seen}
    assert names == {"SGD"}
    # Each group follows the schedule from its own peak: 3e-3 and 2 x 3e-3, halved every step.
    assert [groups for _, groups in seen] == [
        [(3e-3 / 2**s, 0.5), (6e-3 / 2**s, 0.5)] for s in range(4)
    ]
    listing = {entry["name"]: entry for entry in plugin_listing(plugins)}
    registers = {r["name"]: r for r in listing["third_party"]["registers"]}
    sgd, halving = registers["sgd"], registers["halving"]
    assert (sgd["kind"], sgd["name"]) == ("optimizer", "sgd")
    assert [o["name"] for o in sgd["options"]] == ["momentum", "lr_scale"]
    assert (halving["kind"], halving["name"], halving["description"]) == (
        "schedule",
        "halving",
        "Halve every step.",
    )
    saved = json.loads((tmp_path / "r" / "tiny" / "config.json").read_text())
    assert saved["train"]["sgd"] == {"momentum": 0.5, "lr_scale": 2.0}
    # The plugin's scaled group is logged at the rate it steps with.
    records, _ = read_metrics(tmp_path / "r" / "tiny" / "metrics.jsonl")
    assert [(r["lr"], r["lr/0"], r["lr/1"]) for r in records] == [
        (3e-3 / 2**s, 3e-3 / 2**s, 6e-3 / 2**s) for s in range(4)
    ]


def test_register_schedules_a_third_partys_schedule_sets_every_groups_lr_and_the_metric(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    seen: list = []
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "rates"\n')
    overrides = [
        *FOUR_STEPS,
        "train.optimizer=muon",
        "train.schedule=halving",
        "train.muon.lr=0.04",
    ]
    train_experiment(path, session_data_dir, tmp_path / "r", overrides, third_party(seen))
    assert {name for name, _ in seen} == {"CombinedOptimizer"}
    # Muon's matrices from 0.04, AdamW's embeddings and vectors from learning_rate.
    assert [[lr for lr, _ in groups] for _, groups in seen] == [
        [0.04 / 2**s, 3e-3 / 2**s, 3e-3 / 2**s] for s in range(4)
    ]
    # `lr` is the first group's actual rate (Muon's), and each group's where they differ.
    records, _ = read_metrics(tmp_path / "r" / "tiny" / "metrics.jsonl")
    assert [(r["lr"], r["lr/0"], r["lr/1"], r["lr/2"]) for r in records if "train_loss" in r] == [
        (0.04 / 2**s, 0.04 / 2**s, 3e-3 / 2**s, 3e-3 / 2**s) for s in range(4)
    ]


def test_the_built_ins_register_like_any_plugin(installed_plugins):
    assert sorted(installed_plugins.optimizers()) == ["adamw", "muon"]
    assert sorted(installed_plugins.schedules()) == ["constant", "cosine", "linear", "wsd"]
    listing = {entry["name"]: entry for entry in plugin_listing(installed_plugins)}
    assert listing["muon"]["distribution"] == "nanogpt"
    (muon,) = listing["muon"]["registers"]
    assert [o["name"] for o in muon["options"]] == [
        "lr", "momentum", "nesterov", "weight_decay", "ns_steps", "adjust_lr_fn", "ns_dtype", "embed_lr", "head_lr",
    ]  # fmt: skip
    kinds = {(r["kind"], r["name"]) for r in listing["schedules"]["registers"]}
    assert kinds == {("schedule", n) for n in ("cosine", "linear", "constant", "wsd")}


@pytest.mark.parametrize(
    ("toml", "overrides", "expected"),
    [
        ("", ["train.optimizer=muno"], """train.optimizer: no optimizer named 'muno' (did you mean "muon"?); installed: adamw, muon"""),
        ("", ["train.schedule=cosin"], """train.schedule: no schedule named 'cosin' (did you mean "cosine"?); installed: constant, cosine, linear, wsd"""),
        ('[train]\noptimizer = "muon"\n[train.muon]\nmomentun = 0.9\n', [], """train.muon.momentun: unknown key (did you mean "momentum"?)"""),
        ("[train.wds]\ncooldown_fraction = 0.1\n", [], """train.wds: unknown table: no optimizer or schedule is named 'wds' (did you mean "wsd"?); optimizers: adamw, muon; schedules: constant, cosine, linear, wsd"""),
        # A table for a plugin that is not selected is still checked.
        ("[train.muon]\nnesterov = 1\n", [], "train.muon.nesterov: expected true or false, got 1"),
        ("", ["train.muon.adjust_lr_fn=rms"], 'train.muon.adjust_lr_fn: expected one of "original", "match_rms_adamw", got "rms"'),
        ("", ["train.schedule=wsd", "train.wsd.cooldown_fraction=1.5"], "train.wsd.cooldown_fraction: must be in [0, 1], got 1.5"),
        ("", ["train.adamw.lr=1"], 'train.adamw.lr: unknown key'),
        # The core's own record of the tables is no key of [train].
        ("[train.plugin_options]\nmuon = {}\n", [], "train.plugin_options: unknown key"),
    ],
)  # fmt: skip
def test_bad_optimizer_or_schedule_input_is_one_line_and_exit_2(
    tmp_path, toml, overrides, expected
):
    (tmp_path / "exp.toml").write_text(DATASET + toml)
    sets = [arg for override in overrides for arg in ("--set", override)]
    result = gpt("run", "exp.toml", "--dry-run", *sets, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line == f"Error: exp.toml: {expected}"


class NotAnOptimizer:
    def __init__(self, options) -> None:
        pass

    def build(self, model, train, device_type):
        return "adam"


class SkipsVectors(NotAnOptimizer):
    def build(self, model, train, device_type):
        return torch.optim.SGD([p for p in model.parameters() if p.dim() >= 2], lr=0.1)


class NaNSchedule(NotAnOptimizer):
    def lr(self, step, *, peak, floor, warmup_steps, total_steps):
        return float("nan") if step == 3 else peak


def test_what_a_plugin_returns_is_checked_in_one_line():
    from nanogpt_core.config.experiment import TrainConfig
    from nanogpt_core.model.gpt import GPT, GPTConfig
    from nanogpt_core.train.optimization import LearningRates, make_optimizer, make_schedule

    class Bad:
        @hookimpl
        def register_optimizers(self, register):
            register("not_one", NotAnOptimizer)
            register("skips", SkipsVectors)

        @hookimpl
        def register_schedules(self, register):
            register("nan", NaNSchedule)

    plugins = load_plugins(entry_points=False, disabled=())
    plugins.register(Bad(), name="bad")
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8, bias=True))
    with pytest.raises(
        NanoGPTError,
        match=r"^plugin 'bad': optimizer 'not_one': build returned str, not a torch.optim.Optimizer$",
    ):
        make_optimizer(plugins, TrainConfig(optimizer="not_one"), model, "cpu")
    with pytest.raises(
        NanoGPTError,
        match=r"optimizer 'skips': build left parameters out: transformer.h.0.ln_1.weight, ",
    ):
        make_optimizer(plugins, TrainConfig(optimizer="skips"), model, "cpu")
    train = TrainConfig(optimizer="skips", schedule="nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.param_groups[0]["peak_lr"] = 0.1
    rates = LearningRates.for_run(*make_schedule(plugins, train), optimizer, train, 10)
    # The metric is the group's own rate (its peak 0.1), not train.learning_rate's.
    assert rates.apply(optimizer.param_groups, 2) == {"lr": 0.1}
    with pytest.raises(
        PluginFault,
        match=r"^plugin 'bad': schedule 'nan': lr returned nan at step 3, not a finite number$",
    ):
        rates.apply(optimizer.param_groups, 3)


def test_dry_run_shows_the_selected_plugins_tables_only(tmp_path):
    (tmp_path / "exp.toml").write_text(
        DATASET + '[train]\noptimizer = "muon"\nschedule = "wsd"\n[train.muon]\nlr = 0.05\n'
    )
    muon = json.loads(gpt("run", "exp.toml", "--dry-run", cwd=tmp_path).stdout)["train"]
    assert (muon["optimizer"], muon["schedule"]) == ("muon", "wsd")
    assert muon["muon"]["lr"] == 0.05 and muon["muon"]["momentum"] == 0.95  # defaults filled in
    assert muon["wsd"] == {"cooldown_fraction": 0.2}
    # Switching back to AdamW keeps the (checked) Muon table out of the resolved experiment.
    result = gpt("run", "exp.toml", "--dry-run", "--set", "train.optimizer=adamw", cwd=tmp_path)
    adamw = json.loads(result.stdout)["train"]
    assert "muon" not in adamw and "adamw" not in adamw  # adamw has no options of its own


def test_a_changed_optimizer_option_is_a_different_experiment(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(DATASET + '[train]\noptimizer = "muon"\n')
    plugins = load_plugins(disabled=())
    one = load_experiment(path, [], plugins).to_dict()
    two = load_experiment(path, ["train.muon.momentum=0.9"], plugins).to_dict()
    assert config_differences(one, two) == ["train.muon.momentum: 0.95 there, 0.9 now"]
    three = load_experiment(path, ["train.schedule=wsd"], plugins).to_dict()
    assert config_differences(one, three) == [
        'train.schedule: "cosine" there, "wsd" now',
        "train.wsd: (absent) there, a table now",  # one line for a table, not one per option
    ]


def test_muon_resumes_exactly_with_accumulation_and_bf16(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    # bf16 autocast and gradient accumulation on the CPU, Muon + AdamW, checkpoint and resume.
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "checkpoint"\n')
    short = [*MUON, "train.steps_per_epoch=3", "train.eval_every=3", "train.gradient_accumulation_steps=2", "train.mixed_precision=bf16"]  # fmt: skip
    train_experiment(path, session_data_dir, tmp_path / "straight", [*short, "train.epochs=2"])
    train_experiment(path, session_data_dir, tmp_path / "resumed", short)
    train_experiment(path, session_data_dir, tmp_path / "resumed", [*short, "train.epochs=2"])
    straight, resumed = lines(tmp_path / "straight"), lines(tmp_path / "resumed")
    assert [s for s, *_ in straight] == list(range(1, 7))
    assert resumed == straight
    last = load_checkpoint(tmp_path / "resumed" / "tiny" / "checkpoints" / "last.pth", resume=True)
    assert set(last["optimizer"]) == {"muon", "adamw"}
    assert last["optimizer"]["muon"]["param_groups"][0]["peak_lr"] == 0.02


# Killed runs.

KILL_RUN = [
    *MUON,
    "train.steps_per_epoch=60",
    "train.epochs=2",
    "train.eval_every=50",
    "train.schedule=wsd",
]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def kill_after_a_save_past(proc: subprocess.Popen, checkpoint: Path, step: int) -> None:
    """SIGKILL the run once its last.pth is at ``step`` or later (mid-training)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if load_checkpoint(checkpoint, resume=True)["step"] >= step:
                break
        except Exception:  # not written yet, or mid-rename
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.slow
def test_muon_resumes_exactly_after_sigkill(tiny_char_experiment, tmp_path):
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "checkpoint"\nevery_steps = 5\n')
    sets = [part for o in KILL_RUN for part in ("--set", o)]
    common = ["run", str(path), "--data-dir", "data", *sets]
    straight = gpt(*common, "--results-dir", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    checkpoint = tmp_path / "killed" / "tiny" / "checkpoints" / "last.pth"
    # Killed mid-epoch 1: the resumed run crosses the epoch end and finishes.
    kill_after_a_save_past(start([*common, "--results-dir", "killed"], tmp_path), checkpoint, 20)
    final = gpt(*common, "--results-dir", "killed", cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    assert "resuming from step" in final.stdout
    assert lines(tmp_path / "killed") == lines(tmp_path / "straight")


@pytest.mark.slow
def test_muon_under_accelerate_launch_keeps_both_processes_in_sync(
    tiny_char_experiment, session_data_dir, tmp_path
):
    probe = tmp_path / "probe"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
        str(Path(__file__).with_name("distributed_probe.py")),
        str(tiny_char_experiment(name="ddp")), str(tmp_path / "results"), str(session_data_dir),
        str(probe), "train.optimizer=muon", "train.steps_per_epoch=10", "train.eval_every=10",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["processes"], r["end_step"]) for r in ranks] == [(2, 10), (2, 10)]
    # Muon's step is deterministic given the averaged gradients: the weights stay equal.
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    last = load_checkpoint(tmp_path / "results" / "ddp" / "checkpoints" / "last.pth", resume=True)
    assert set(last["optimizer"]) == {"muon", "adamw"}


def test_the_lr_metric_is_the_rate_a_scaled_optimizer_steps_with(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    seen: list = []
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "rates"\n')
    overrides = [*FOUR_STEPS, "train.optimizer=tenth", "train.warmup_steps=2"]
    train_experiment(path, session_data_dir, tmp_path / "r", overrides, third_party(seen))
    stepped = [groups[0][0] for _, groups in seen]
    assert stepped[-1] < 3e-4  # a tenth of learning_rate = 3e-3, decaying
    records, _ = read_metrics(tmp_path / "r" / "tiny" / "metrics.jsonl")
    assert [r["lr"] for r in records if "train_loss" in r] == stepped
    assert not any(key.startswith("lr/") for r in records for key in r)  # one group, one rate
