"""Results folders written by an older nanogpt still sample, resume and export.

The folders under ``tests/fixtures/`` were written by the commit their
``expected.json`` names (``tests/fixtures/make_results_fixtures.py`` made them):
a GPT-2-shaped run and a run of the fast recipe (RoPE, RMSNorm, ReLU², QK-norm,
untied head, soft-capped logits, Muon). Each test copies a folder, so the
fixtures are never written to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
OLD_RUNS = sorted(path for path in FIXTURES.iterdir() if (path / "expected.json").exists())


def gpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def copy_run(old: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The old run in a scratch folder: its experiment file and its results folder."""
    name = old.name.split("-", 1)[1]
    experiment = tmp_path / f"{name}.toml"
    shutil.copy(old / "experiment.toml", experiment)
    results = tmp_path / "results" / name
    shutil.copytree(old / "results", results)
    return experiment, results


def test_the_fixtures_are_there():
    assert {path.name.split("-", 1)[1] for path in OLD_RUNS} == {"gpt2", "fast"}


@pytest.mark.parametrize("old", OLD_RUNS, ids=lambda path: path.name)
def test_an_old_checkpoint_samples_the_text_it_sampled_then(old, tmp_path):
    expected = json.loads((old / "expected.json").read_text())
    ckpt = old / "results" / "checkpoints" / "last.pth"
    done = gpt("sample", "--ckpt", str(ckpt), "--device", "cpu", *expected["sample_args"],
               cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected["sample"]


@pytest.mark.slow
@pytest.mark.parametrize("old", OLD_RUNS, ids=lambda path: path.name)
def test_an_old_results_folder_resumes_where_it_stopped(old, tmp_path):
    experiment, results = copy_run(old, tmp_path)
    before = (results / "metrics.jsonl").read_text().splitlines()
    saved_step = json.loads(before[-1])["step"]
    done = gpt("run", experiment.name, "--data-dir", str(tmp_path / "data"),
               "--set", "train.epochs=2", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"resuming from step {saved_step} (epoch 1)" in done.stdout, done.stdout
    lines = (results / "metrics.jsonl").read_text().splitlines()
    assert lines[: len(before)] == before  # what the old run measured is kept as it was
    steps = [json.loads(line)["step"] for line in lines[len(before) :]]
    assert steps == list(range(saved_step + 1, 2 * saved_step + 1))
    resumed = torch.load(results / "checkpoints" / "last.pth", weights_only=True)
    assert resumed["step"] == 2 * saved_step
    assert all(torch.isfinite(t).all() for t in resumed["model"].values())


def test_an_old_gpt2_shaped_checkpoint_exports_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nanogpt_core.generate.sampling import load_model

    (old,) = [path for path in OLD_RUNS if path.name.endswith("-gpt2")]
    ckpt = old / "results" / "checkpoints" / "last.pth"
    done = gpt("export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(ckpt, "cpu").model
    ids = torch.randint(
        0, ours.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert (hf(ids).logits - ours.head_logits(ours.hidden(ids))).abs().max().item() < 1e-4


def test_an_old_fast_recipe_checkpoint_is_refused_by_export_in_one_line(tmp_path):
    (old,) = [path for path in OLD_RUNS if path.name.endswith("-fast")]
    ckpt = old / "results" / "checkpoints" / "last.pth"
    done = gpt("export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert 'model.mlp = "relu2"' in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "hf").exists()
