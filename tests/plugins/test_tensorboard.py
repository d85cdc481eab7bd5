"""The tensorboard callback, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json

import pytest

from nanogpt_core import Callback, hookimpl
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.run import run_experiment

CALLBACKS = """
[[callbacks]]
plugin = "fake_eval"

[[callbacks]]
plugin = "fixed_prompts"
prompts = ["ROMEO:"]
max_new_tokens = 8

[[callbacks]]
plugin = "tensorboard"
flush_secs = 1
"""


class FakeEval(Callback):
    """Logs a made-up score after each evaluation, as the eval callback does."""

    def on_eval_end(self, state):
        state.log_metrics({"eval/fake/acc": state.step / 100})


class FakeEvalPlugin:
    @hookimpl
    def register_callbacks(self, register):
        register("fake_eval", lambda options: FakeEval())


def test_scalars_match_metrics_jsonl_and_samples_are_logged(
    tiny_char_experiment, session_data_dir, tmp_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plugins = load_plugins(disabled=())
    plugins.register(FakeEvalPlugin(), name="fake_eval")
    overrides = [
        "train.epochs=2",
        "train.steps_per_epoch=6",
        "train.eval_every=3",
        "train.eval_batches=2",
        "train.log_every=2",
    ]
    config = load_experiment(tiny_char_experiment(extra=CALLBACKS), overrides, plugins)
    run_experiment(
        config, plugins, results_dir=tmp_path / "r", data_dir=session_data_dir, progress=False
    )
    root = tmp_path / "r" / "tiny"
    records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]

    events = EventAccumulator(str(root / "logs"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for key, tag in [
        ("train_loss", "train/loss"),
        ("lr", "lr"),
        ("grad_norm", "grad_norm"),
        ("tokens_per_sec", "tokens_per_sec"),
        ("tokens", "tokens"),
        # A key a callback logged is a tag of its own.
        ("eval/fake/acc", "eval/fake/acc"),
    ]:
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = [(r["step"], r[key]) for r in records if key in r]
        assert [s for s, _ in logged] == [s for s, _ in expected], tag
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    assert [s for s, _ in logged] == [3, 6, 9, 12]  # eval/fake/acc: after each evaluation
    val = [(e.step, e.value) for e in events.Scalars("val/loss")]
    assert val == [
        (r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in records if "val_loss" in r
    ]
    assert "mfu" not in events.Tags()["scalars"]  # null on a CPU: nothing to plot
    tensors = events.Tags()["tensors"]
    assert "config/text_summary" in tensors
    samples = [t for t in tensors if t.startswith("samples/")]
    assert samples, tensors
    steps = sorted(e.step for e in events.Tensors(samples[0]))
    assert steps == [6, 12]
    assert list((root / "logs").glob("events.out.tfevents.*"))
