"""Options that nothing uses are one rule: a warning line each, then left out.

A ``[train.<name>]`` table of an optimizer or schedule that is not selected, and
``model.rope_theta`` with learned positions, are checked like any option, then
ignored with one ``warning:`` line naming the file, the table or key, and both
ways out. ``gpt`` prints it once, from the main process of an ``accelerate
launch``. Built-in plugin options keep the ranges their algorithms define.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.errors import ConfigError
from nanogpt_core.plugins.registry import load_plugins

EXPERIMENT = """
[dataset]
plugin = "shakespeare"

[model]
rope_theta = 500.0

[train]
optimizer = "adamw"

[train.muon]
lr = 0.01

[train.wsd]
cooldown_fraction = 0.1
"""
WARNINGS = [
    'warning: exp.toml: model.rope_theta is ignored: model.position is "learned"; '
    'remove it or set model.position = "rope"',
    'warning: exp.toml: [train.muon] is ignored: train.optimizer is "adamw"; '
    'remove it or set train.optimizer = "muon"',
    'warning: exp.toml: [train.wsd] is ignored: train.schedule is "cosine"; '
    'remove it or set train.schedule = "wsd"',
]


def dry_run(folder: Path, *sets: str, env: dict[str, str] | None = None):
    args = [arg for assignment in sets for arg in ("--set", assignment)]
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", "run", "exp.toml", "--dry-run", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_unselected_tables_and_rope_theta_are_one_warning_line_each(tmp_path):
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == WARNINGS
    resolved = json.loads(result.stdout)
    assert "muon" not in resolved["train"] and "wsd" not in resolved["train"]
    assert resolved["model"]["rope_theta"] is None  # what the model computes with


def test_selected_options_warn_about_nothing_else(tmp_path):
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    result = dry_run(tmp_path, "train.optimizer=muon", "train.schedule=wsd", "model.position=rope")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    resolved = json.loads(result.stdout)
    assert resolved["train"]["muon"]["lr"] == 0.01
    assert resolved["train"]["wsd"] == {"cooldown_fraction": 0.1}
    assert resolved["model"]["rope_theta"] == 500.0


def test_only_the_main_process_of_a_launch_warns(tmp_path):
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    assert dry_run(tmp_path, env={"RANK": "0"}).stderr.splitlines() == WARNINGS
    other = dry_run(tmp_path, env={"RANK": "1"})
    assert (other.returncode, other.stderr) == (0, "")


def test_an_ignored_table_is_still_checked(tmp_path):
    (tmp_path / "exp.toml").write_text(EXPERIMENT.replace("lr = 0.01", "momentum = 5.0"))
    result = dry_run(tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "Error: exp.toml: train.muon.momentum: must be in [0, 1), got 5.0"
    ]


def test_the_warnings_reach_callers_of_load_experiment(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT)
    warnings: list[str] = []
    config = load_experiment(path, ["train.schedule=wsd"], load_plugins(disabled=()), warnings)
    assert [f"warning: {w}" for w in warnings] == [
        WARNINGS[0].replace("exp.toml", str(path)),
        WARNINGS[1].replace("exp.toml", str(path)),
    ]
    assert config.model.rope_theta is None
    assert set(config.train.plugin_options) == {"adamw", "wsd"}  # the selected ones


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("temperature", "1e-300", "1e-300 is not a temperature: use 0 (greedy) or 0.0001 to 10000"),
        ("temperature", "-1", "-1 is not a temperature: use 0 (greedy) or 0.0001 to 10000"),
        ("seed", "18446744073709551616", "18446744073709551616 is not a seed: use 0 to "),
        ("seed", "-1", "-1 is not a seed: use 0 to 18446744073709551615"),
    ],
)
def test_fixed_prompts_sampling_options_have_gpt_samples_ranges(tmp_path, key, value, problem):
    path = tmp_path / "exp.toml"
    path.write_text(
        '[dataset]\nplugin = "shakespeare"\n[[callbacks]]\nplugin = "fixed_prompts"\n'
        f"{key} = {value}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_experiment(path, (), load_plugins(disabled=()))
    (line,) = caught.value.problems
    assert line.startswith(f"{path}: callbacks[0].{key}: {problem}")
