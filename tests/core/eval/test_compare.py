"""`gpt compare`: the table and JSON equal the runs' metrics; the plot is a labelled PNG."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, TINY_CHAR_EXPERIMENT

from nanogpt_core import Callback, hookimpl
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.eval.compare import plot_runs, read_runs
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.metrics import read_metrics
from nanogpt_core.train.run import run_experiment

EVAL_CALLBACK = """
[[callbacks]]
plugin = "fake_eval"
"""
OVERRIDES = [
    "train.epochs=2",
    "train.steps_per_epoch=3",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.log_every=2",
]


class FakeEval(Callback):
    """Logs made-up scores after each evaluation, as the eval callback does."""

    def on_eval_end(self, state):
        state.log_metrics({"eval/fake/acc": state.step / 100, "eval/fake/f1": 1 - state.step / 50})


class FakeEvalPlugin:
    @hookimpl
    def register_callbacks(self, register):
        register("fake_eval", lambda options: FakeEval())


def gpt(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, session_data_dir) -> Path:
    """Two real tiny runs: ``evaluated`` (2 epochs, logs eval scores) and ``plain`` (1 epoch)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    folder = tmp_path_factory.mktemp("compare")
    text = SHARED_DATA / "tinyshakespeare" / "input.txt"
    evaluated = folder / "evaluated.toml"
    evaluated.write_text(TINY_CHAR_EXPERIMENT.format(name="evaluated", path=text) + EVAL_CALLBACK)
    plain = folder / "plain.toml"
    plain.write_text(TINY_CHAR_EXPERIMENT.format(name="plain", path=text))
    plugins = load_plugins(disabled=())
    plugins.register(FakeEvalPlugin(), name="fake_eval")
    for path, overrides in ((evaluated, OVERRIDES), (plain, OVERRIDES[1:])):
        config = load_experiment(path, overrides, plugins)
        run_experiment(
            config,
            plugins,
            results_dir=folder / "results",
            data_dir=session_data_dir,
            progress=False,
        )
    return folder / "results"


def expected_row(root: Path) -> dict:
    """What the table must say, computed straight from the run's metrics.jsonl."""
    lines, _ = read_metrics(root / "metrics.jsonl")
    vals = [(line["val_loss"], line["step"]) for line in lines if "val_loss" in line]
    best = min(vals, key=lambda v: v[0])
    evals = {}
    for line in lines:
        evals.update({k: v for k, v in line.items() if k.startswith("eval/")})
    return {
        "run": root.name,
        "path": str(root),
        "done": (root / "done").exists(),
        "final_val_loss": vals[-1][0],
        "best_val_loss": best[0],
        "best_val_step": best[1],
        "steps": lines[-1]["step"],
        "tokens": lines[-1]["tokens"],
        "wall_s": lines[-1]["elapsed_s"],
        "tokens_per_sec": lines[-1]["tokens"] / lines[-1]["elapsed_s"],
        "eval": evals,
    }


def test_compare_json_and_table_hold_the_runs_metrics(runs):
    evaluated, plain = runs / "evaluated", runs / "plain"
    shown = gpt("compare", str(evaluated), str(plain), "--json", cwd=runs)
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert rows == [expected_row(evaluated), expected_row(plain)]
    assert rows[0]["steps"] == 6 and rows[1]["steps"] == 3 and rows[1]["eval"] == {}
    assert rows[0]["eval"] == {"eval/fake/acc": 0.06, "eval/fake/f1": 1 - 6 / 50}

    table = gpt("compare", str(evaluated), str(plain), cwd=runs)
    assert table.returncode == 0, table.stderr
    header, rule, *cells = table.stdout.splitlines()
    assert set(rule) == {"-", " "} and len(cells) == 2
    columns = [c for c in header.split("  ") if c]
    assert columns == [
        "run", "done", "final val", "best val (step)", "steps", "tokens", "wall", "tokens/s",
        "fake/acc", "fake/f1",
    ]  # fmt: skip
    starts = [header.index(c) for c in columns]

    def cell(line: str, column: int) -> str:
        end = starts[column + 1] if column + 1 < len(starts) else None
        return line[starts[column] : end].strip()

    for line, row in zip(cells, rows, strict=True):
        assert cell(line, 0) == row["run"]
        assert cell(line, 1) == "yes"
        assert cell(line, 2) == f"{row['final_val_loss']:.4f}"
        assert cell(line, 3) == f"{row['best_val_loss']:.4f} ({row['best_val_step']})"
        assert cell(line, 4) == str(row["steps"])
        assert cell(line, 5) == f"{row['tokens']:,}"
        assert cell(line, 7) == f"{row['tokens_per_sec']:,.0f}"
    assert [cell(cells[0], 8), cell(cells[0], 9)] == ["0.0600", "0.8800"]
    assert [cell(cells[1], 8), cell(cells[1], 9)] == ["-", "-"]  # blank where a run has none


def test_the_plot_is_a_png_labelled_with_the_runs(runs, tmp_path):
    from PIL import Image

    out = tmp_path / "plots" / "compare.png"
    args = ["compare", str(runs / "evaluated"), str(runs / "plain"), "--plot", str(out)]
    shown = gpt(*args, "--x", "tokens", cwd=runs)
    assert shown.returncode == 0, shown.stderr
    assert f"wrote {out}" in shown.stdout
    with Image.open(out) as image:
        image.verify()  # a whole, valid PNG
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1300, 500)  # two panels: evals too
        assert image.text["Description"] == "runs: evaluated, plain"
    assert not list(out.parent.glob(".*"))  # written atomically: no temporary left

    # The figure itself: shared axes, one labelled curve per run and loss, the x axis asked for.
    figure = plot_runs(read_runs([runs / "evaluated", runs / "plain"]), x="tokens")
    loss, scores = figure.axes
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [
        "evaluated train", "evaluated val", "plain train", "plain val",
    ]  # fmt: skip
    assert [t.get_text() for t in scores.get_legend().get_texts()] == [
        "evaluated fake/acc", "evaluated fake/f1",
    ]  # fmt: skip
    assert loss.get_xlabel() == "tokens"
    lines, _ = read_metrics(runs / "evaluated" / "metrics.jsonl")
    evaluated_val = loss.get_lines()[1]
    assert list(evaluated_val.get_xdata()) == [r["tokens"] for r in lines if "val_loss" in r]
    assert list(evaluated_val.get_ydata()) == [r["val_loss"] for r in lines if "val_loss" in r]
    elapsed = plot_runs(read_runs([runs / "plain"]), x="elapsed")
    assert len(elapsed.axes) == 1 and elapsed.axes[0].get_xlabel() == "elapsed (s)"


def test_a_folder_that_is_not_a_run_is_one_line(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    shown = gpt("compare", str(runs / "plain"), str(tmp_path / "empty"), cwd=tmp_path)
    assert shown.returncode == 2
    assert shown.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'empty'}: not a run folder (no metrics.jsonl); "
        "give results/<name>/ folders"
    ]
    assert shown.stdout == ""


def test_without_matplotlib_plot_is_one_line_naming_the_extra(runs, tmp_path):
    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["matplotlib"] = None\n')
    args = ["compare", str(runs / "plain"), "--plot", str(tmp_path / "x.png")]
    shown = gpt(*args, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert shown.returncode == 2
    assert shown.stderr.strip().splitlines() == [
        "Error: gpt compare --plot needs matplotlib: pip install 'nanogpt[plot]'"
    ]
    assert not (tmp_path / "x.png").exists()
    # Without --plot, compare needs no matplotlib.
    table = gpt("compare", str(runs / "plain"), cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert table.returncode == 0 and table.stdout.startswith("run ")


def test_runs_of_the_same_name_are_labelled_by_path(runs, tmp_path):
    other = tmp_path / "old" / "plain"
    shutil.copytree(runs / "plain", other, ignore=shutil.ignore_patterns("checkpoints"))
    labels = [run.label for run in read_runs([runs / "plain", other, runs / "evaluated"])]
    assert labels == [str(runs / "plain"), str(other), "evaluated"]
