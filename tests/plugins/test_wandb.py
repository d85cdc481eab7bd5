"""The wandb callback, offline: runs read back with wandb's own reader (``wandb leet inspect``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nanogpt_core import metric_scalars
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.errors import ConfigError
from nanogpt_core.train.checkpoints import load_checkpoint
from nanogpt_core.train.metrics import read_metrics

pytest.importorskip("wandb")

CALLBACKS = """
[[callbacks]]
plugin = "fake_eval"

[[callbacks]]
plugin = "wandb"
mode = "offline"
tags = ["test", "tiny"]

[[callbacks]]
plugin = "fixed_prompts"
prompts = ["ROMEO:"]
max_new_tokens = 8

[[callbacks]]
plugin = "checkpoint"
"""
SCHEDULE = [
    "train.epochs=2",
    "train.steps_per_epoch=3",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.log_every=2",
]
# A third party's callback that logs a score after each evaluation, as an eval callback does.
FAKE_EVAL = """
from nanogpt_core import Callback, hookimpl

class FakeEval(Callback):
    def on_eval_end(self, state):
        state.log_metrics({"eval/fake/acc": state.step / 100})

@hookimpl
def register_callbacks(register):
    register("fake_eval", lambda options: FakeEval())
"""


@pytest.fixture
def site(tmp_path) -> Path:
    """A folder for PYTHONPATH holding the fake_eval plugin as an installed distribution."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "fake_eval.py").write_text(textwrap.dedent(FAKE_EVAL))
    info = site / "fake_eval-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-eval\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[nanogpt]\nfake_eval = fake_eval\n")
    return site


def gpt(*args, cwd, site):
    home = cwd / "wandb-home"  # W&B's settings, caches and staged tables: never the user's
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "OMP_NUM_THREADS": "1",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
    }
    for name in ("WANDB_MODE", "WANDB_API_KEY"):  # the experiment's options decide
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def inspect(run_folder: Path) -> list[dict]:
    """The records of an offline run's ``.wandb`` log, as wandb itself reads them."""
    wandb = str(Path(sys.executable).with_name("wandb"))
    shown = subprocess.run(
        [wandb, "leet", "inspect", "--json", str(run_folder)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=True,
    )
    return [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]


def history(records: list[dict]) -> dict[int, dict]:
    """Each logged step's values, merged over the history records of that step."""
    rows: dict[int, dict] = {}
    for record in records:
        if record["type"] == "history":
            step = int(record["history"]["step"].get("num", 0))
            rows.setdefault(step, {}).update(record["history"]["item"])
    return rows


def expected_history(lines: list[dict]) -> dict[int, dict]:
    """What W&B should hold per step: a step's later lines (what callbacks logged) win."""
    rows: dict[int, dict] = {}
    for line in lines:
        rows.setdefault(line["step"], {}).update(metric_scalars(line))
    return rows


def the_run(records: list[dict]) -> dict:
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    return run


def samples_table(run_folder: Path) -> list[list]:
    """The rows of the newest samples table the run logged (the tables hold every row so far)."""
    tables = sorted((run_folder / "files" / "media" / "table").glob("samples_*.table.json"))
    newest = max(tables, key=lambda p: int(p.name.split("_")[1]))
    table = json.loads(newest.read_text())
    assert table["columns"] == ["step", "tag", "text"]
    return table["data"]


@pytest.mark.slow
def test_offline_run_holds_the_scalars_config_and_samples_and_resume_continues_it(
    tiny_char_experiment, session_data_dir, tmp_path, site
):
    path = tiny_char_experiment(extra=CALLBACKS)
    args = ["run", str(path), "--data-dir", str(session_data_dir)]
    args += [part for override in SCHEDULE for part in ("--set", override)]
    first = gpt(*args, cwd=tmp_path, site=site)
    assert first.returncode == 0, first.stderr[-3000:]
    root = tmp_path / "results" / "tiny"
    (folder,) = (root / "wandb").glob("offline-run-*")
    records = inspect(folder)
    run = the_run(records)
    assert (run["display_name"], run["project"], run["tags"]) == (
        "tiny",
        "nanogpt",
        ["test", "tiny"],
    )
    config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    assert config == json.loads((root / "config.json").read_text())

    lines, _ = read_metrics(root / "metrics.jsonl")
    logged = history(records)
    # Every numeric value of every metrics.jsonl line, under TensorBoard's names, at its step.
    expected = expected_history(lines)
    assert set(logged) == set(expected) == {2, 3, 4, 6}
    for step, values in expected.items():
        assert {tag: logged[step][tag] for tag in values} == pytest.approx(values, rel=1e-12)
    assert logged[6]["eval/fake/acc"] == 0.06 and logged[6]["val/loss"] == pytest.approx(
        lines[-2]["val_loss"]
    )
    # The fixed prompts' samples of both epoch ends, as (step, tag, text) rows.
    rows = samples_table(folder)
    assert [(step, tag) for step, tag, _ in rows] == [(3, "samples/ROMEO:"), (6, "samples/ROMEO:")]
    for (_, _, sample), epoch in zip(rows, (1, 2), strict=True):
        assert sample in (root / "samples" / f"epoch_{epoch:04d}.txt").read_text()
    exit_codes = [r["exit"]["exit_code"] for r in records if r["type"] == "exit"]
    assert exit_codes == [0]
    checkpoint = load_checkpoint(root / "checkpoints" / "last.pth", resume=True)
    (state,) = [c["state"] for c in checkpoint["callbacks"] if c["plugin"] == "wandb"]
    assert state["run_id"] == run["run_id"]

    # Training on for a third epoch resumes from last.pth: the same W&B run continues.
    second = gpt(*args, "--set", "train.epochs=3", cwd=tmp_path, site=site)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from step 6" in second.stdout
    (resumed,) = set((root / "wandb").glob("offline-run-*")) - {folder}
    records = inspect(resumed)
    assert the_run(records)["run_id"] == run["run_id"]
    lines, _ = read_metrics(root / "metrics.jsonl")
    logged = history(records)
    expected = {step: v for step, v in expected_history(lines).items() if step > 6}
    assert set(logged) == set(expected) == {8, 9}
    for step, values in expected.items():
        assert {tag: logged[step][tag] for tag in values} == pytest.approx(values, rel=1e-12)
    # The samples table keeps the rows from before the resume (they travel in the checkpoint).
    assert [step for step, _, _ in samples_table(resumed)] == [3, 6, 9]


def test_without_wandb_installed_the_run_stops_in_one_line_naming_the_extra(
    tiny_char_experiment, session_data_dir, tmp_path, site
):
    (site / "sitecustomize.py").write_text('import sys\nsys.modules["wandb"] = None\n')
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "wandb"\nmode = "offline"\n')
    result = gpt("run", str(path), "--data-dir", str(session_data_dir), cwd=tmp_path, site=site)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: the wandb callback needs the wandb package: pip install 'nanogpt[wandb]'"
    )
    assert not (tmp_path / "results" / "tiny" / "metrics.jsonl").exists()  # before training


@pytest.mark.slow
def test_online_without_a_login_is_one_line(tiny_char_experiment, session_data_dir, tmp_path, site):
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "wandb"\n')
    result = gpt("run", str(path), "--data-dir", str(session_data_dir), cwd=tmp_path, site=site)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: wandb: No API key configured. Use `wandb login` to log in. "
        '(or set mode = "offline")'
    )


def test_options_are_checked(tiny_char_experiment, installed_plugins):
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "wandb"\nmode = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"callbacks\[0\]\.mode: expected one of"):
        load_experiment(path, (), installed_plugins)
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "wandb"\ntags = ["ok", ""]\n')
    with pytest.raises(ConfigError, match=r"callbacks\[0\]\.tags: expected non-empty strings"):
        load_experiment(path, (), installed_plugins)
