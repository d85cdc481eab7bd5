"""`gpt batch`: ordering, abstract bases, skipping finished runs, failures, the summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt_core.cli.batch_runs import experiments_in
from nanogpt_core.errors import NanoGPTError

TINY = """
extends = "base.toml"
[model]
n_layer = 1
n_head = 2
n_embd = 16
block_size = 16
[train]
batch_size = 2
steps_per_epoch = {steps}
eval_every = 2
eval_batches = 1
log_every = 1
"""


@pytest.fixture
def folder(tmp_path, shared_data):
    exps = tmp_path / "exps"
    exps.mkdir()
    text = shared_data / "tinyshakespeare" / "input.txt"
    (exps / "base.toml").write_text(
        f'abstract = true\n[dataset]\nplugin = "shakespeare"\npath = "{text}"\n'
    )
    (exps / "b_second.toml").write_text(TINY.format(steps=2))
    (exps / "a_first.toml").write_text(TINY.format(steps=3))
    (exps / "c_broken.toml").write_text(TINY.format(steps=2).replace("n_embd = 16", "n_embd = 15"))
    return exps


def gpt(*args, cwd, env=None):
    script = str(Path(sys.executable).with_name("gpt"))
    return subprocess.run(
        [script, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


def plotted_runs(png: Path) -> str:
    """The runs a batch-summary.png names, after checking it is a whole PNG."""
    from PIL import Image

    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG"
        return image.text["Description"]


def test_folders_run_sorted_without_abstract_bases_or_by_their_list(folder):
    assert [p.name for p in experiments_in([folder])] == [
        "a_first.toml",
        "b_second.toml",
        "c_broken.toml",
    ]
    (folder / "experiment_list.conf").write_text(
        "# the order we want\nb_second.toml\n\na_first.toml  # after\n"
    )
    assert [p.name for p in experiments_in([folder])] == ["b_second.toml", "a_first.toml"]
    (folder / "experiment_list.conf").write_text("gone.toml\n")
    with pytest.raises(NanoGPTError, match=r"line 1: gone\.toml: file not found"):
        experiments_in([folder])
    with pytest.raises(NanoGPTError, match="abstract = true"):
        experiments_in([folder / "base.toml"])


@pytest.mark.slow
def test_batch_runs_each_in_a_subprocess_goes_on_after_a_failure_and_skips_done(
    folder, tmp_path, session_data_dir
):
    args = ["batch", str(folder), "--results-dir", "results", "--data-dir", str(session_data_dir)]
    first = gpt(*args, cwd=tmp_path)
    assert first.returncode == 1, first.stderr
    table = first.stdout[first.stdout.index("experiment  ") :].splitlines()
    assert table[0].split() == ["experiment", "status", "val", "loss", "steps", "duration"]
    rows = {line.split()[0]: line.split() for line in table[2:]}
    assert rows["a_first"][1] == "done" and rows["a_first"][3] == "3"
    assert rows["b_second"][1] == "done" and rows["b_second"][3] == "2"
    assert rows["c_broken"][1] == "failed"
    done = json.loads((tmp_path / "results" / "a_first" / "done").read_text())
    assert done["step"] == 3 and rows["a_first"][2] == f"{done['val_loss']:.4f}"
    assert "model.n_embd: 15 is not divisible by n_head = 2" in first.stderr
    # The batch's loss curves: the runs that have metrics (c_broken never started).
    assert plotted_runs(tmp_path / "results" / "batch-summary.png") == "runs: a_first, b_second"

    (folder / "c_broken.toml").unlink()
    second = gpt(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert [line.split()[1] for line in second.stdout.splitlines()[-2:]] == ["skipped", "skipped"]

    rerun = gpt(*args, "--rerun", cwd=tmp_path)
    assert rerun.returncode == 0
    assert [line.split()[1] for line in rerun.stdout.splitlines()[-2:]] == ["done", "done"]
    assert len(list((tmp_path / "results").glob("a_first.old-*"))) == 1


def test_stop_on_error_and_launcher(folder, tmp_path, session_data_dir):
    (folder / "experiment_list.conf").write_text("c_broken.toml\na_first.toml\n")
    args = ["batch", str(folder), "--results-dir", "results", "--data-dir", str(session_data_dir)]
    stopped = gpt(*args, "--stop-on-error", cwd=tmp_path)
    assert stopped.returncode == 1
    assert "a_first" not in stopped.stdout.split("experiment  ", 1)[1]
    # A launcher goes in front of `-m nanogpt_core run ...`; here a plain interpreter with a flag.
    launched = gpt(
        "batch",
        str(folder / "a_first.toml"),
        "--launcher",
        f"{sys.executable} -X utf8",
        "--results-dir",
        "results",
        "--data-dir",
        str(session_data_dir),
        cwd=tmp_path,
    )
    assert launched.returncode == 0, launched.stderr
    assert f"{sys.executable} -X utf8 -m nanogpt_core run" in launched.stdout
    assert plotted_runs(tmp_path / "results" / "batch-summary.png") == "runs: a_first"
    # Without matplotlib the batch still succeeds; a note says how to get the plot.
    (tmp_path / "results" / "batch-summary.png").unlink()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        'import sys\nsys.modules["matplotlib"] = None\n'
    )
    args = ["batch", str(folder / "a_first.toml"), "--results-dir", "results"]
    again = gpt(*args, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")})
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip().splitlines() == [
        f"note: for a plot of the batch ({Path('results') / 'batch-summary.png'}): "
        "pip install 'nanogpt[plot]'"
    ]
    assert not (tmp_path / "results" / "batch-summary.png").exists()


def test_run_of_a_finished_experiment_says_so(folder, tmp_path, session_data_dir):
    args = ["run", str(folder / "b_second.toml"), "--data-dir", str(session_data_dir)]
    assert gpt(*args, cwd=tmp_path).returncode == 0
    again = gpt(*args, cwd=tmp_path)
    assert again.returncode == 0 and "already finished" in again.stdout
