"""The plugin example of docs/plugins.md, pip-installed as a separate distribution."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def docs_example() -> dict[str, str]:
    """The two files of the plugin example in docs/plugins.md, exactly as written there."""
    page = (REPO / "docs" / "plugins.md").read_text()
    section = page.split("## A complete example", 1)[1].split("\n## ", 1)[0]
    files = {}
    for name in ("pyproject.toml", "nanogpt_counting.py"):
        match = re.search(rf"`{re.escape(name)}`:\n\n```\w+\n(.*?)```", section, re.DOTALL)
        assert match, f"the plugin example of docs/plugins.md lacks {name}"
        files[name] = match.group(1)
    return files


def pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def counting_plugin(tmp_path_factory):
    """Install the example into this environment for the module's tests, then remove it."""
    folder = tmp_path_factory.mktemp("nanogpt-counting")
    for name, text in docs_example().items():
        (folder / name).write_text(text)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    pip("install", "--no-deps", *isolation, str(folder))
    try:
        yield folder
    finally:
        pip("uninstall", "--yes", "nanogpt-counting")


def gpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = str(Path(sys.executable).with_name("gpt"))
    return subprocess.run([script, *args], cwd=cwd, capture_output=True, text=True, check=False)


EXPERIMENT = """
[dataset]
plugin = "counting"
max_number = 20

[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 32

[train]
batch_size = 4
steps_per_epoch = 6
warmup_steps = 2
eval_every = 3
eval_batches = 2
log_every = 3
"""


def test_third_party_plugin_is_listed(counting_plugin, tmp_path):
    listed = gpt("plugins", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    entry = {p["name"]: p for p in json.loads(listed.stdout)}["counting"]
    assert (entry["distribution"], entry["version"]) == ("nanogpt-counting", "0.1.0")
    (registered,) = entry["registers"]
    assert [o["name"] for o in registered["options"]] == ["documents", "max_number"]


def test_third_party_plugin_options_are_checked(counting_plugin, tmp_path):
    (tmp_path / "count.toml").write_text(EXPERIMENT)
    dry = gpt("run", "count.toml", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["dataset"] == {
        "plugin": "counting",
        "documents": 2000,
        "max_number": 20,
    }
    bad = gpt("run", "count.toml", "--set", "dataset.max_numbr=3", cwd=tmp_path)
    assert bad.returncode == 2
    assert (
        bad.stderr
        == 'Error: count.toml: dataset.max_numbr: unknown key (did you mean "max_number"?)\n'
    )


def test_third_party_dataset_trains(counting_plugin, tmp_path):
    (tmp_path / "count.toml").write_text(EXPERIMENT)
    run = gpt("run", "count.toml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    meta = json.loads((tmp_path / "data" / "counting" / "max20" / "meta.json").read_text())
    assert meta["tokenizer"]["chars"] == "\n .0123456789"
    lines = (tmp_path / "results" / "count" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 6]
