"""The trainer: schedule, metrics, callback lifecycle, failures, devices and precision."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanogpt_core import Callback, hookimpl
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.errors import NanoGPTError, TrainingError
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.model_setup import padded_vocab_size
from nanogpt_core.train.run import run_experiment

METRIC_KEYS = {
    "step",
    "epoch",
    "train_loss",
    "lr",
    "grad_norm",
    "tokens_per_sec",
    "mfu",
    "tokens",
    "elapsed_s",
}


def test_vocab_is_padded_to_a_multiple_of_64():
    assert padded_vocab_size(65) == 128
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(128) == 128


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_tiny_model_learns_and_logs_metrics(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    path = tiny_char_experiment()
    final = train_experiment(path, session_data_dir, tmp_path / "results")
    config = load_experiment(path, (), load_plugins(disabled=()))
    root = tmp_path / "results" / "tiny"
    saved = json.loads((root / "config.json").read_text())
    assert saved == config.to_dict()
    lines = read_metrics(root / "metrics.jsonl")
    assert [line["step"] for line in lines] == list(range(5, 41, 5))
    assert all(set(line) >= METRIC_KEYS for line in lines)
    evaluated = [line for line in lines if "val_loss" in line]
    assert [line["step"] for line in evaluated] == [20, 40]
    # An untrained model scores about ln(65) = 4.17 on 65 characters.
    assert evaluated[-1]["val_loss"] < 3.6 < math.log(65)
    assert evaluated[-1]["train_loss"] < evaluated[0]["train_loss"]
    assert lines[-1]["lr"] == pytest.approx(3e-4)
    assert all(line["mfu"] is None for line in lines)  # no known peak on a CPU
    assert final["val_loss"] == evaluated[-1]["val_loss"]


class Recorder(Callback):
    def __init__(self, name, calls):
        self.name = name
        self.calls = calls

    def _record(self, hook, state):
        self.calls.append((self.name, hook, state.step, state.epoch, state.status))

    def on_train_start(self, state):
        self._record("on_train_start", state)

    def on_step_end(self, state):
        self._record("on_step_end", state)

    def on_eval_end(self, state):
        assert {"train_loss", "val_loss"} <= set(state.metrics)
        self._record("on_eval_end", state)

    def on_epoch_end(self, state):
        self._record("on_epoch_end", state)

    def on_checkpoint(self, state, path):
        self._record(f"on_checkpoint {path.name}", state)

    def on_metrics(self, state, record):
        assert record is state.record and record["step"] == state.step
        self._record("on_metrics", state)

    def on_train_end(self, state):
        self._record("on_train_end", state)


def recording_plugins(calls, poison_at=None):
    class Recording:
        @hookimpl
        def register_callbacks(self, register):
            register("first", lambda options: Recorder("first", calls))
            register("second", lambda options: Recorder("second", calls))
            register("poison", lambda options: Poison(poison_at))

    plugins = load_plugins(disabled=())
    plugins.register(Recording(), name="recording")
    return plugins


class Poison(Callback):
    """Turns the weights into NaN after a given step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, state):
        if state.step == self.step:
            with torch.no_grad():
                for p in state.model.parameters():
                    p.fill_(float("nan"))


CALLBACKS = '\n[[callbacks]]\nplugin = "second"\n\n[[callbacks]]\nplugin = "first"\n'
WITH_CHECKPOINT = CALLBACKS + '\n[[callbacks]]\nplugin = "checkpoint"\nevery_steps = 3\n'


def test_callback_hooks_are_called_in_order_at_each_point(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    calls = []
    overrides = [
        "train.epochs=2",
        "train.steps_per_epoch=2",
        "train.eval_every=3",
        "train.eval_batches=1",
    ]
    train_experiment(
        tiny_char_experiment(extra=WITH_CHECKPOINT),
        session_data_dir,
        tmp_path / "r",
        overrides,
        recording_plugins(calls),
    )
    expected_one = [
        ("on_train_start", 0, 1, "running"),
        ("on_step_end", 1, 1, "running"),
        ("on_step_end", 2, 1, "running"),
        ("on_epoch_end", 2, 1, "running"),
        # The checkpoint plugin asked at the epoch end; the core wrote both files.
        ("on_checkpoint ckpt_epoch_1.pth", 2, 1, "running"),
        ("on_checkpoint last.pth", 2, 1, "running"),
        # Steps 3 and 4 evaluate, so they write a metrics line (log_every is 5).
        ("on_metrics", 3, 2, "running"),
        ("on_step_end", 3, 2, "running"),
        ("on_eval_end", 3, 2, "running"),
        ("on_checkpoint last.pth", 3, 2, "running"),
        ("on_metrics", 4, 2, "running"),
        ("on_step_end", 4, 2, "running"),
        ("on_eval_end", 4, 2, "running"),
        ("on_epoch_end", 4, 2, "running"),
        ("on_checkpoint ckpt_epoch_2.pth", 4, 2, "running"),
        ("on_checkpoint last.pth", 4, 2, "running"),
        ("on_train_end", 4, 2, "completed"),
    ]
    # Each hook goes to "second" then "first": the experiment's order.
    assert calls == [(name, *call) for call in expected_one for name in ("second", "first")]


def test_nan_steps_are_skipped_until_too_many_in_a_row_stop_after_on_train_end(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    calls = []
    extra = CALLBACKS + '\n[[callbacks]]\nplugin = "poison"\n'
    # NaN weights from step 3 on: steps 4 and 5 are skipped, and two in a row stop the run.
    with pytest.raises(
        TrainingError, match=r"^step 5: 2 steps skipped in a row \(the last: loss nan"
    ):
        train_experiment(
            tiny_char_experiment(extra=extra),
            session_data_dir,
            tmp_path / "r",
            ["train.steps_per_epoch=10", "train.max_skips_in_a_row=2"],
            recording_plugins(calls, poison_at=3),
        )
    # The state still shows the last step that completed: step 5 failed.
    assert calls[-2:] == [
        ("second", "on_train_end", 4, 1, "failed"),
        ("first", "on_train_end", 4, 1, "failed"),
    ]


def test_bf16_autocast_and_gradient_accumulation_on_cpu(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    overrides = [
        "train.mixed_precision=bf16",
        "train.gradient_accumulation_steps=2",
        "train.steps_per_epoch=4",
        "train.eval_every=4",
        "train.eval_batches=1",
        "train.log_every=2",
    ]
    final = train_experiment(tiny_char_experiment(), session_data_dir, tmp_path / "r", overrides)
    assert math.isfinite(final["val_loss"])
    lines = read_metrics(tmp_path / "r" / "tiny" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [2, 4]
    # tokens per step: batch 8 x block 32 x 2 micro-steps
    assert [line["tokens"] for line in lines] == [2 * 512, 4 * 512]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.device=cuda", 'train.device = "cuda" but no CUDA device is available'),
        ("train.mixed_precision=fp16", 'train.mixed_precision = "fp16" needs a GPU'),
        (
            "model.vocab_size=64",
            "model.vocab_size = 64 is smaller than the data's vocabulary of 65",
        ),
        ("model.block_size=200000", "the val split of .* has only 111540 tokens"),
    ],
)
def test_impossible_settings_are_refused_before_training(
    tiny_char_experiment, session_data_dir, tmp_path, override, message, train_experiment
):
    if override.startswith("train.device") and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(NanoGPTError, match=message):
        train_experiment(
            tiny_char_experiment(),
            session_data_dir,
            tmp_path / "r",
            [override, "train.steps_per_epoch=1"],
        )


def test_init_from_a_hugging_face_folder(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=128,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(config)
    hf.save_pretrained(tmp_path / "hf")

    seen = {}

    class Grab:
        @hookimpl
        def register_callbacks(self, register):
            class Capture(Callback):
                def on_train_start(self, state):
                    seen["wpe"] = state.model.transformer.wpe.weight.detach().clone()

            register("capture", lambda options: Capture())

    plugins = load_plugins(disabled=())
    plugins.register(Grab(), name="grab")
    path = tiny_char_experiment(extra='\n[[callbacks]]\nplugin = "capture"\n')
    overrides = [
        f'model.init_from="{tmp_path / "hf"}"',
        "model.bias=true",
        "train.steps_per_epoch=1",
        "train.eval_batches=1",
    ]
    train_experiment(path, session_data_dir, tmp_path / "r", overrides, plugins)
    # block_size 32 keeps the first 32 of the 64 positions.
    assert torch.equal(seen["wpe"], hf.transformer.wpe.weight.detach()[:32])

    with pytest.raises(NanoGPTError, match=r"model\.n_layer = 3 but"):
        train_experiment(
            path, session_data_dir, tmp_path / "r2", [*overrides, "model.n_layer=3"], plugins
        )


FASTER_RECIPE = [
    "train.optimizer=muon",
    "train.schedule=wsd",
    "model.position=rope",
    "model.norm=rmsnorm",
    "model.mlp=relu2",
    "model.qk_norm=true",
    "model.tie_embeddings=false",
    "model.logit_softcap=15.0",
]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [[], FASTER_RECIPE], ids=["nanogpt", "faster"])
def test_compile_wraps_the_model_and_trains(
    recipe, tiny_char_experiment, session_data_dir, tmp_path, train_experiment
):
    overrides = [
        "train.compile=true",
        "train.steps_per_epoch=3",
        "train.eval_every=3",
        "train.eval_batches=1",
        *recipe,
    ]
    final = train_experiment(tiny_char_experiment(), session_data_dir, tmp_path / "r", overrides)
    assert math.isfinite(final["val_loss"])


def test_first_interrupt_requests_a_stop_and_a_second_ctrl_c_aborts():
    import signal

    from nanogpt_core.train.trainer import StopRequest

    stop = StopRequest()
    with stop.installed():
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop._handle(signal.SIGTERM, None)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGTERM) != stop._handle  # restored afterwards


@pytest.mark.slow
def test_nanogpt_baby_run_reaches_its_published_loss(shared_data, session_data_dir, tmp_path):
    """nanoGPT's CPU baby configuration ends near val loss 1.88 (about three minutes)."""
    from pathlib import Path

    experiments = Path(__file__).resolve().parents[3] / "experiments"
    experiment = experiments / "cpu" / "shakespeare_char_cpu.toml"
    path = shared_data / "tinyshakespeare" / "input.txt"
    plugins = load_plugins(disabled=())
    config = load_experiment(experiment, [f'dataset.path="{path}"', "callbacks=[]"], plugins)
    final = run_experiment(
        config, plugins, results_dir=tmp_path, data_dir=session_data_dir, progress=False
    )
    assert 1.80 < final["val_loss"] < 1.95
