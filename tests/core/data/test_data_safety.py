"""Data folders under stress: edited inputs, damaged meta.json, faulty plugins, kills and locks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.data.preparation import prepare_dataset
from nanogpt_core.data.prepared import open_prepared
from nanogpt_core.errors import DataError
from nanogpt_core.plugins.registry import load_plugins


def gpt(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def prepare(experiment: Path, data_dir: Path, force: bool = False):
    plugins = load_plugins(disabled=())
    config = load_experiment(experiment, (), plugins)
    return prepare_dataset(config, plugins, data_dir=data_dir, force=force)


def shakespeare(tmp_path: Path, text: str) -> Path:
    source = tmp_path / "input.txt"
    source.write_text(text)
    experiment = tmp_path / "exp.toml"
    experiment.write_text('[dataset]\nplugin = "shakespeare"\npath = "input.txt"\n')
    return experiment


# The fingerprint covers the input files.


def test_an_edit_that_keeps_size_and_mtime_is_still_seen(tmp_path):
    experiment = shakespeare(tmp_path, "To be, or not to be: that is the question.\n" * 50)
    first = prepare(experiment, tmp_path / "data")
    source = tmp_path / "input.txt"
    stamp = source.stat()
    source.write_text(source.read_text().replace("question", "QUESTION"))
    os.utime(source, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # as `cp -p` would leave it
    second = prepare(experiment, tmp_path / "data")
    assert second.meta["fingerprint"] != first.meta["fingerprint"]
    assert "Q" in second.tokenizer["chars"] and "Q" not in first.tokenizer["chars"]
    [identity] = second.meta["inputs"]
    assert identity["path"] == str(source.resolve()) and identity["size"] == stamp.st_size
    assert len(identity["sha256"]) == 64


def test_a_big_file_touched_is_prepared_again(tmp_path, shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    assert len(text.encode()) > 1 << 20  # above the size that is hashed
    experiment = shakespeare(tmp_path, text)
    first = prepare(experiment, tmp_path / "data")
    assert "sha256" not in first.meta["inputs"][0]
    assert prepare(experiment, tmp_path / "data").meta == first.meta  # untouched: reused
    source = tmp_path / "input.txt"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    again = prepare(experiment, tmp_path / "data")
    assert again.meta["fingerprint"] != first.meta["fingerprint"]


# meta.json is checked.

DAMAGE = {
    "splits": lambda m: m.pop("splits"),
    "splits.val.tokens": lambda m: m["splits"]["val"].update(tokens="many"),
    "dtype": lambda m: m.update(dtype="float32"),
    "tokenizer": lambda m: m.update(tokenizer="char"),
    "tokenizer.kind": lambda m: m["tokenizer"].pop("kind"),
    "tokenizer.vocab_size": lambda m: m["tokenizer"].update(vocab_size=True),
    "splits.train.tokens ": lambda m: m.update(dtype="uint32"),  # contradicts the .bin sizes
    "splits.train.tokens": lambda m: m["splits"]["train"].update(tokens=12),
}


@pytest.mark.parametrize("key", list(DAMAGE))
def test_a_meta_json_with_the_wrong_structure_is_refused(tmp_path, key):
    experiment = shakespeare(tmp_path, "Some text to learn from.\n" * 40)
    prepared = prepare(experiment, tmp_path / "data")
    meta_path = prepared.folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    DAMAGE[key](meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError) as info:
        prepare(experiment, tmp_path / "data")
    message = str(info.value)
    assert message.startswith(f"{meta_path}: {key.strip()}: ") and "\n" not in message
    assert "gpt prepare EXPERIMENT --force" in message and f"delete {prepared.folder}" in message
    again = prepare(experiment, tmp_path / "data", force=True)  # --force: no complaint
    assert again.meta["splits"] == prepared.meta["splits"]


def test_a_missing_bin_file_is_refused_and_an_unfinished_meta_prepares_again(tmp_path):
    experiment = shakespeare(tmp_path, "Some text to learn from.\n" * 40)
    prepared = prepare(experiment, tmp_path / "data")
    prepared.split_path("val").unlink()
    with pytest.raises(
        DataError, match=r"splits\.val\.tokens: says 100 tokens but .*val\.bin is missing"
    ):
        open_prepared(prepared.folder)
    (prepared.folder / "meta.json").write_text("{")  # torn: that preparation never finished
    assert prepare(experiment, tmp_path / "data").tokens("val") == 100


def test_a_damaged_meta_json_is_one_line_from_the_cli(tmp_path):
    experiment = shakespeare(tmp_path, "Some text to learn from.\n" * 40)
    assert gpt("prepare", str(experiment), "--data-dir", "data", cwd=tmp_path).returncode == 0
    meta_path = tmp_path / "data" / "shakespeare" / "tiny-char" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "dtype": "int8"}))
    result = gpt("prepare", str(experiment), "--data-dir", "data", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "meta.json: dtype: expected uint16 or uint32, got 'int8'" in result.stderr
    forced = gpt("prepare", str(experiment), "--data-dir", "data", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(meta_path.read_text())["dtype"] == "uint16"


# Faults of a third-party dataset plugin, installed for a subprocess only.

FAULTY_PLUGIN = '''
"""A dataset plugin that fails in the ways the FAULT environment variable asks."""
import os

import attrs
from nanogpt_core import DataError, hookimpl


@attrs.frozen(kw_only=True)
class Options:
    pass


class Source:
    variant = "v"
    tokenizer = "char"
    description = "faulty"

    def split_documents(self, downloads):
        yield "train", "some text " * 100
        yield "val", "more text " * 100
        if os.environ["FAULT"] == "documents":
            raise ZeroDivisionError("division by zero in the reader")
        if os.environ["FAULT"] == "data":
            raise DataError("rows.jsonl: line 3: not valid JSON")

    def documents(self, split, downloads):
        return (d for s, d in self.split_documents(downloads) if s == split)


class NoVariant:
    tokenizer = "char"
    description = "lacks a variant"

    def documents(self, split, downloads):
        return []


def factory(options):
    if os.environ["FAULT"] == "factory":
        raise KeyError("token")
    return NoVariant() if os.environ["FAULT"] == "shape" else Source()


@hookimpl
def register_datasets(register):
    register("faulty", factory, options=Options)
'''


@pytest.fixture
def faulty_plugin(tmp_path) -> dict[str, str]:
    """An environment whose PYTHONPATH holds the plugin and its entry point (dist-info)."""
    site = tmp_path / "site"
    (site / "faulty_dataset-0.1.dist-info").mkdir(parents=True)
    (site / "faulty_dataset.py").write_text(FAULTY_PLUGIN)
    info = site / "faulty_dataset-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: faulty-dataset\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[nanogpt]\nfaulty = faulty_dataset\n")
    (tmp_path / "exp.toml").write_text('[dataset]\nplugin = "faulty"\n')
    return {**os.environ, "PYTHONPATH": str(site)}


@pytest.mark.parametrize(
    ("fault", "status", "message"),
    [
        (
            "documents",
            1,
            "dataset plugin 'faulty' failed in split_documents: "
            "ZeroDivisionError: division by zero in the reader",
        ),
        ("factory", 1, "dataset plugin 'faulty' failed in its factory: KeyError: 'token'"),
        ("data", 2, "rows.jsonl: line 3: not valid JSON"),
        (
            "shape",
            2,
            "dataset plugin 'faulty': its factory returned NoVariant, which lacks variant (a string)",
        ),
    ],
)
def test_a_faulty_dataset_plugin_is_one_line_and_publishes_nothing(
    tmp_path, faulty_plugin, fault, status, message
):
    env = {**faulty_plugin, "FAULT": fault}
    result = gpt("prepare", "exp.toml", "--data-dir", "data", cwd=tmp_path, env=env)
    assert result.returncode == status, result.stderr
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob(".*.tmp-*"))
    if status == 1:
        debug = gpt("--debug", "prepare", "exp.toml", "--data-dir", "d", cwd=tmp_path, env=env)
        assert debug.returncode == 1 and "Traceback" in debug.stderr


# Processes: one writer, no orphans, Ctrl-C.


def big_gpt2_experiment(tmp_path: Path, shared_data: Path, copies: int = 40) -> Path:
    """A TinyStories preparation big enough to use worker processes for a few seconds."""
    story_file = shared_data / "tinystories" / "derived_tiny-stories_endoftext.txt"
    files = ", ".join(f'"{story_file}"' for _ in range(copies))
    experiment = tmp_path / "big.toml"
    experiment.write_text(
        textwrap.dedent(f"""\
            [dataset]
            plugin = "tinystories"
            source = "local"
            train_files = [{files}]
            val_fraction = 0.02
            """)
    )
    return experiment


def start_prepare(tmp_path: Path, experiment: Path, data_dir: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nanogpt_core", "prepare", str(experiment), "--data-dir", data_dir],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def wait_for_tokens(proc: subprocess.Popen, folder: Path, at_least: int = 1_000_000) -> None:
    """Wait until the prepare has written ``at_least`` bytes of training tokens."""
    deadline = time.monotonic() + 60

    def written() -> int:
        total = 0
        for part in folder.glob(".train.bin.tmp-*"):
            with contextlib.suppress(FileNotFoundError):  # renamed meanwhile
                total += part.stat().st_size
        return total

    while written() < at_least:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "prepare ended"
        assert time.monotonic() < deadline, "prepare wrote nothing for a minute"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_second_prepare_waits_for_the_first_and_uses_its_result(tmp_path, shared_data):
    experiment = big_gpt2_experiment(tmp_path, shared_data)
    folder = tmp_path / "data" / "tinystories" / "local-gpt2"
    first = start_prepare(tmp_path, experiment, "data", text=True)
    wait_for_tokens(first, folder, at_least=1)
    second = start_prepare(tmp_path, experiment, "data", text=True)
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert f"waiting for pid {first.pid}, which is preparing data/tinystories/local-gpt2" in err2
    assert err2.count("waiting for") == 1
    assert out1 == out2 == "prepared data/tinystories/local-gpt2\n"
    # The second used the first's files rather than preparing (and renaming) its own.
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] * 2 == (folder / "train.bin").stat().st_size
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_worker_and_no_open_pipe(tmp_path, shared_data):
    experiment = big_gpt2_experiment(tmp_path, shared_data)
    folder = tmp_path / "data" / "tinystories" / "local-gpt2"
    proc = start_prepare(tmp_path, experiment, "data")
    wait_for_tokens(proc, folder)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers, "the prepare should encode in worker processes"
    proc.kill()  # the parent alone, as the OOM killer or `kill -9 PID` would
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert alive == []
    start = time.monotonic()
    proc.stdout.read()  # EOF only once no process holds the pipe
    proc.stderr.read()
    assert time.monotonic() - start < 3
    rerun = gpt("prepare", str(experiment), "--data-dir", "data", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.slow
def test_ctrl_c_during_prepare_stops_promptly_with_status_130(tmp_path, shared_data):
    experiment = big_gpt2_experiment(tmp_path, shared_data)
    folder = tmp_path / "data" / "tinystories" / "local-gpt2"
    proc = start_prepare(tmp_path, experiment, "data", start_new_session=True, text=True)
    wait_for_tokens(proc, folder)
    workers = psutil.Process(proc.pid).children(recursive=True)
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - start < 5
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert alive == []
    assert list(folder.iterdir()) == []  # no temporaries, nothing published
