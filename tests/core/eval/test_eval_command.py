"""`gpt eval`: val_loss equals the trainer's, --log, --json, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt_core.train.metrics import read_metrics


def gpt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "nanogpt_core", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def one_error_line(done: subprocess.CompletedProcess, fragment: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in done.stderr


@pytest.fixture
def char_run(char_checkpoint: Path) -> tuple[Path, Path]:
    """The tiny char run's checkpoint and experiment file (trained once per session)."""
    return char_checkpoint, char_checkpoint.parents[3] / "exp.toml"


@pytest.mark.slow
def test_val_loss_equals_what_the_trainer_logged(char_run, session_data_dir):
    ckpt, experiment = char_run
    metrics, _ = read_metrics(ckpt.parents[1] / "metrics.jsonl")
    last = [r for r in metrics if "val_loss" in r][-1]
    done = gpt(
        "eval",
        "--ckpt",
        str(ckpt),
        "--task",
        "val_loss",
        "--experiment",
        str(experiment),
        "--data-dir",
        str(session_data_dir),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["step"] == last["step"]
    scores = result["tasks"]["val_loss"]["metrics"]
    # The same fixed batches and weights as the run's last evaluation: equal, not close.
    assert scores == {"val_loss": last["val_loss"], "train_loss": last["train_loss"]}
    assert result["tasks"]["val_loss"]["n"] == 2 * 4  # eval_batches x batch_size


@pytest.mark.slow
def test_log_appends_to_the_run_under_its_lock(char_run, session_data_dir, tmp_path):
    import shutil

    from nanogpt_core.locks import locked
    from nanogpt_core.train.callbacks import RunPaths

    ckpt, experiment = char_run
    run = tmp_path / "results" / "char"
    shutil.copytree(ckpt.parents[1], run)
    copy = run / "checkpoints" / "last.pth"
    before = (run / "metrics.jsonl").read_text()
    args = ["eval", "--ckpt", str(copy), "--task", "val_loss", "--experiment", str(experiment)]
    args += ["--data-dir", str(session_data_dir), "--set", "eval.val_loss.splits=['val']", "--log"]

    with locked(RunPaths(run).lock, wait=False, purpose="test"):
        held = gpt(*args)
    one_error_line(held, "pid")
    assert (run / "metrics.jsonl").read_text() == before

    done = gpt(*args)
    assert done.returncode == 0, done.stderr
    assert "val_loss" in done.stdout and f"logged to {run / 'metrics.jsonl'}" in done.stdout
    records, torn = read_metrics(run / "metrics.jsonl")
    assert torn == 0
    assert set(records[-1]) == {"step", "eval/val_loss/val_loss", "eval_checkpoint"}
    assert records[-1]["step"] == records[-2]["step"]
    assert records[-1]["eval_checkpoint"] == "last.pth"
    assert (run / "metrics.jsonl").read_text().startswith(before)
    # gpt compare shows the logged score beside the run's own numbers.
    compared = gpt("compare", str(run), "--json")
    assert compared.returncode == 0, compared.stderr
    (summary,) = json.loads(compared.stdout)
    assert summary["eval"] == {"eval/val_loss/val_loss": records[-1]["eval/val_loss/val_loss"]}
    assert summary["steps"] == records[-2]["step"]


def test_eval_errors_are_one_line(char_run, tmp_path):
    ckpt, _ = char_run
    sample = tmp_path / "rows.jsonl"
    sample.write_text(json.dumps({"ctx": "Ω", "endings": ["a", "b"], "label": 0}) + "\n")
    one_error_line(gpt("eval", "--ckpt", str(ckpt)), "name a task with --task (installed: ")
    one_error_line(
        gpt("eval", "--ckpt", str(ckpt), "--task", "helaswag"),
        "no eval task named 'helaswag' (did you mean \"hellaswag\"?)",
    )
    one_error_line(
        gpt("eval", "--ckpt", str(ckpt), "--task", "val_loss"),
        "this task needs an experiment: pass --experiment EXP.toml",
    )
    one_error_line(
        gpt("eval", "--ckpt", str(ckpt), "--task", "val_loss", "--data", str(sample)),
        "--data: no task here reads a data file (val_loss)",
    )
    one_error_line(
        gpt("eval", "--ckpt", str(ckpt), "--task", "hellaswag", "-o", "hellaswag.dta=1"),
        'eval.hellaswag.dta: unknown key (did you mean "data"?)',
    )
    one_error_line(
        gpt("eval", "--ckpt", str(ckpt), "--task", "hellaswag", "-o", "val_loss.batches=1"),
        "'val_loss' is not a task of this evaluation",
    )
    # A char-level model cannot read text outside its alphabet.
    one_error_line(
        gpt("eval", "--ckpt", str(ckpt), "--task", "hellaswag", "--data", str(sample)), "Ω"
    )
    outside = tmp_path / "elsewhere.pth"
    outside.write_bytes(ckpt.read_bytes())
    one_error_line(
        gpt("eval", "--ckpt", str(outside), "--task", "hellaswag", "--log"),
        "is not in a run's folder",
    )
    one_error_line(
        gpt("eval", "--ckpt", str(tmp_path / "none.pth"), "--task", "hellaswag"), "none.pth"
    )


def test_hellaswag_offline_points_at_data(char_run, monkeypatch, tmp_path):
    import datasets
    from click.testing import CliRunner

    from nanogpt_core.cli import make_cli
    from nanogpt_core.plugins.registry import load_plugins

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    # An empty cache: a copy an earlier run left in ~/.cache would be read instead.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    ckpt, _ = char_run
    result = CliRunner().invoke(
        make_cli(load_plugins(disabled=())), ["eval", "--ckpt", str(ckpt), "--task", "hellaswag"]
    )
    assert result.exit_code == 2
    assert "could not read Rowan/hellaswag from the Hugging Face hub" in result.output
    assert "pass a local copy with --data hellaswag_val.jsonl" in result.output


def test_experiment_eval_tables_are_checked_and_paths_resolved(write_toml, installed_plugins):
    from nanogpt_core.config.experiment_file import load_experiment
    from nanogpt_core.errors import ConfigError

    base = '[dataset]\nplugin = "shakespeare"\n'
    good = write_toml("sub/good.toml", base + '[eval.hellaswag]\ndata = "hs.jsonl"\n')
    config = load_experiment(good, (), installed_plugins)
    assert config.eval["hellaswag"].data == str(good.parent / "hs.jsonl")
    assert config.to_dict()["eval"] == {
        "hellaswag": {
            "data": str(good.parent / "hs.jsonl"),
            "hub_name": "Rowan/hellaswag",
            "split": "validation",
        }
    }
    # Experiments without [eval] keep today's config.json.
    plain = write_toml("plain.toml", base)
    assert "eval" not in load_experiment(plain, (), installed_plugins).to_dict()
    for text, message in (
        (
            '[eval.helaswag]\ndata = "x"\n',
            "eval.helaswag: no eval task named 'helaswag' (did you mean \"hellaswag\"?)",
        ),
        (
            "[eval.val_loss]\nsplits = ['test']\n",
            "eval.val_loss.splits: ['test']: list one or both of",
        ),
        ("[eval.val_loss]\nbatches = 1.5\n", "eval.val_loss.batches: expected an integer"),
        ("[eval]\nval_loss = 3\n", "eval.val_loss: expected a table"),
    ):
        bad = write_toml("bad.toml", base + text)
        with pytest.raises(ConfigError) as info:
            load_experiment(bad, (), installed_plugins)
        assert info.value.problems == [f"{bad}: {message}"] or message in str(info.value), str(
            info.value
        )


@pytest.mark.slow
def test_gpt_eval_names_the_task_once_in_each_note(char_run):
    from click.testing import CliRunner

    from nanogpt_core import EvalResult, hookimpl
    from nanogpt_core.cli import make_cli
    from nanogpt_core.plugins.registry import load_plugins

    class Noted:
        def __init__(self, options) -> None:
            pass

        def evaluate(self, evaluator) -> EvalResult:
            return EvalResult({"one": 1.0}, n=1, notes=("lambada_like: 3 passages were cut",))

    class Plugin:
        @hookimpl
        def register_eval_tasks(self, register):
            register("lambada_like", Noted)

    plugins = load_plugins(disabled=())
    assert plugins.register(Plugin(), name="noted")
    ckpt, _ = char_run
    result = CliRunner().invoke(
        make_cli(plugins), ["eval", "--ckpt", str(ckpt), "--task", "lambada_like"]
    )
    assert result.exit_code == 0, result.output
    assert "note: lambada_like: 3 passages were cut" in result.output.splitlines()
    assert "lambada_like: lambada_like" not in result.output
