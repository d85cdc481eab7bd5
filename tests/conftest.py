"""Shared fixtures: fresh plugin managers, experiment files and the real data samples."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from nanogpt_core.plugins.registry import Plugins, load_plugins

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the repo; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def installed_plugins() -> Plugins:
    """A fresh plugin manager with every installed entry point loaded."""
    return load_plugins(disabled=())


@pytest.fixture
def write_toml(tmp_path: Path) -> Callable[..., Path]:
    """Write a TOML file (dedented) into the test's temp folder and return its path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    return write


TINY_CHAR_EXPERIMENT = """
name = "{name}"
seed = 1337

[dataset]
plugin = "shakespeare"
path = "{path}"

[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32

[train]
batch_size = 8
epochs = 1
steps_per_epoch = 40
learning_rate = 3e-3
min_lr = 3e-4
warmup_steps = 5
eval_every = 20
eval_batches = 4
log_every = 5
beta2 = 0.99
"""


@pytest.fixture(scope="session")
def session_data_dir(tmp_path_factory) -> Path:
    """A data folder shared by the whole session, so each dataset is prepared once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def tiny_char_experiment(shared_data: Path, tmp_path: Path) -> Callable[..., Path]:
    """Write a tiny char-level Tiny Shakespeare experiment (plus extra TOML) and return its path."""

    def write(name: str = "tiny", extra: str = "") -> Path:
        text = TINY_CHAR_EXPERIMENT.format(
            name=name, path=shared_data / "tinyshakespeare" / "input.txt"
        )
        path = tmp_path / f"{name}.toml"
        path.write_text(text + textwrap.dedent(extra))
        return path

    return write


def _train_tiny(experiment_text: str, folder: Path, data_dir: Path) -> Path:
    from nanogpt_core.config.experiment_file import load_experiment
    from nanogpt_core.train.run import run_experiment

    path = folder / "exp.toml"
    path.write_text(experiment_text + '\n[[callbacks]]\nplugin = "checkpoint"\n')
    plugins = load_plugins(disabled=())
    config = load_experiment(path, (), plugins)
    run_experiment(
        config, plugins, results_dir=folder / "results", data_dir=data_dir, progress=False
    )
    return folder / "results" / config.name / "checkpoints" / "last.pth"


TINY_MODEL = """
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 64

[train]
batch_size = 4
steps_per_epoch = 20
learning_rate = 3e-3
warmup_steps = 2
eval_every = 20
eval_batches = 2
"""


@pytest.fixture(scope="session")
def char_checkpoint(tmp_path_factory, session_data_dir) -> Path:
    """A real last.pth of a tiny char-level model trained on Tiny Shakespeare."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    text = SHARED_DATA / "tinyshakespeare" / "input.txt"
    body = f'name = "char"\n[dataset]\nplugin = "shakespeare"\npath = "{text}"\n' + TINY_MODEL
    return _train_tiny(body, tmp_path_factory.mktemp("char_ckpt"), session_data_dir)


@pytest.fixture(scope="session")
def bpe_checkpoint(tmp_path_factory, session_data_dir) -> Path:
    """A real last.pth of a tiny GPT-2-BPE model trained on TinyStories rows."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    ts = SHARED_DATA / "tinystories"
    body = (
        f'name = "bpe"\n[dataset]\nplugin = "tinystories"\nsource = "local"\n'
        f'train_files = ["{ts / "derived_train.parquet"}"]\nval_files = ["{ts / "derived_validation.jsonl"}"]\n'
        + TINY_MODEL
    )
    return _train_tiny(body, tmp_path_factory.mktemp("bpe_ckpt"), session_data_dir)


# Every way Python code copies a tensor's values to the host (a wait for a GPU).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture
def count_host_reads() -> Callable[[Callable[[], object]], int]:
    """``count(run)``: how many times ``run()`` reads tensor values back to the host.

    Counts calls of torch.Tensor's own reading methods (patched for the call),
    so scoring code is measured as it is, without replacing any of our functions.
    """

    def count(run: Callable[[], object]) -> int:
        import torch

        calls: list[str] = []
        patch = pytest.MonkeyPatch()
        try:
            for name in HOST_READS:
                original = getattr(torch.Tensor, name)

                def counted(self, *args, _original=original, _name=name, **kwargs):
                    calls.append(_name)
                    return _original(self, *args, **kwargs)

                patch.setattr(torch.Tensor, name, counted)
            run()
        finally:
            patch.undo()
        return len(calls)

    return count


@pytest.fixture
def tiny_trainer():
    """Build a Trainer (one layer, width 16, CPU) on ``tokens`` random char ids per split.

    Called as ``tiny_trainer(folder, tokens)``; two fixed batches of four per evaluation.
    """
    import numpy as np

    from nanogpt_core.config.experiment import (
        ExperimentConfig,
        ModelConfig,
        PluginSpec,
        TrainConfig,
    )
    from nanogpt_core.data.prepared import PreparedData
    from nanogpt_core.train.callbacks import RunPaths
    from nanogpt_core.train.run import make_accelerator
    from nanogpt_core.train.trainer import Trainer

    def build(folder: Path, tokens: int) -> Trainer:
        folder.mkdir(parents=True)
        for split in ("train", "val"):
            np.random.default_rng(0).integers(0, 65, tokens, dtype=np.uint16).tofile(
                folder / f"{split}.bin"
            )
        meta = {
            "tokenizer": {
                "kind": "char",
                "vocab_size": 65,
                "chars": [chr(32 + i) for i in range(65)],
            },
            "dtype": "uint16",
            "splits": {s: {"tokens": tokens} for s in ("train", "val")},
        }
        train = TrainConfig(batch_size=4, steps_per_epoch=2, eval_batches=2, device="cpu")
        config = ExperimentConfig(
            name="tiny",
            dataset=PluginSpec(plugin="none"),
            model=ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=16),
            train=train,
        )
        data = PreparedData(folder, meta)
        paths = RunPaths(folder / "run")
        return Trainer(
            config, data, [], paths, make_accelerator(train), progress=False, plugins=load_plugins()
        )

    return build


@pytest.fixture
def train_experiment() -> Callable[..., dict]:
    """Train an experiment file in this process, as ``gpt run`` does; returns the final metrics.

    Called as ``train_experiment(path, data_dir, results, overrides=(), plugins=None)``:
    ``overrides`` are ``--set`` strings; ``plugins`` defaults to every installed plugin.
    """
    from nanogpt_core.config.experiment_file import load_experiment
    from nanogpt_core.train.run import run_experiment

    def train(
        path: Path,
        data_dir: Path,
        results: Path,
        overrides: Sequence[str] = (),
        plugins: Plugins | None = None,
    ) -> dict:
        plugins = plugins or load_plugins(disabled=())
        config = load_experiment(path, list(overrides), plugins)
        return run_experiment(
            config, plugins, results_dir=results, data_dir=data_dir, progress=False
        )

    return train


class LocalHub:
    """The Hugging Face hub, served from local files by ``datasets``' own streaming readers.

    ``serve(name, split, path)`` makes ``datasets.load_dataset(name, split=split,
    streaming=True)`` stream ``path`` (parquet, json or jsonl) with the builder
    of its format, so rows arrive as the hub's would. ``calls`` records each
    ``(name, subset, split, streaming)``; ``served[split]`` counts the rows a
    split gave, so a test sees where the reading stopped.
    """

    def __init__(self, real_load_dataset: Callable[..., Any]) -> None:
        self.real_load_dataset = real_load_dataset
        self.files: dict[tuple[str, str], Path] = {}
        self.calls: list[tuple[str, str | None, str, bool]] = []
        self.served: dict[str, int] = {}
        self.closed: list[str] = []  # splits whose stream was closed (a cap, or its end)

    def serve(self, name: str, split: str, path: Path) -> None:
        """Serve ``path`` as the ``split`` split of the hub dataset ``name``."""
        self.files[(name, split)] = path

    def load_dataset(self, name: str, subset: str | None = None, *, split: str, streaming=False):
        """Stand-in for ``datasets.load_dataset``: a stream of the file served as ``split``."""
        import datasets

        self.calls.append((name, subset, split, streaming))
        path = self.files[(name, split)]
        builder = "parquet" if path.suffix == ".parquet" else "json"
        stream = self.real_load_dataset(
            builder, data_files={split: str(path)}, split=split, streaming=True
        )
        assert isinstance(stream, datasets.IterableDataset)
        return self._counted(stream, split)

    def _counted(self, stream, split: str):
        self.served.setdefault(split, 0)
        try:
            for row in stream:
                self.served[split] += 1
                yield row
        finally:
            self.closed.append(split)


@pytest.fixture
def local_hub(monkeypatch, tmp_path) -> LocalHub:
    """A :class:`LocalHub` in place of the hub, with a fresh ``datasets`` cache under tmp_path."""
    import datasets

    hub = LocalHub(datasets.load_dataset)
    monkeypatch.setattr(datasets, "load_dataset", hub.load_dataset)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    # The stand-in "is" at localhost, which resolves offline (the core looks the host up first).
    monkeypatch.setenv("HF_ENDPOINT", "http://localhost")
    return hub


# The compatibility suite (tests/compat/): each folder under packages/ is a plugin
# distribution written exactly as an earlier release's documentation told an
# author to. The session builds them with pip (offline: --no-index
# --no-build-isolation, setuptools from this environment) into a temporary
# --target folder, so nothing is installed into the environment itself; commands
# run with that folder first on PYTHONPATH, where importlib.metadata finds their
# dist-info and entry points as it finds any installed distribution.
COMPAT_PACKAGES = Path(__file__).resolve().parent / "compat" / "packages"


@pytest.fixture(scope="session")
def compat_site(tmp_path_factory) -> Iterator[Path]:
    """A folder holding every package of ``packages/``, installed by pip (removed at the end)."""
    root = tmp_path_factory.mktemp("compat")
    sources = []
    for package in sorted(p for p in COMPAT_PACKAGES.iterdir() if (p / "pyproject.toml").is_file()):
        # Built from a copy: an in-tree build leaves build/ and *.egg-info behind.
        sources.append(shutil.copytree(package, root / "src" / package.name))
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
        + ["--no-deps", "--no-index", "--no-build-isolation", "--target", str(site)]
        + [str(s) for s in sources],
        check=True,
        capture_output=True,
    )
    try:
        yield site
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def gpt_compat(compat_site):
    """``gpt_compat(*args, cwd=...)``: run ``gpt`` in a subprocess that sees the compat packages."""

    def run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        path = [str(compat_site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
        return subprocess.run(
            [sys.executable, "-m", "nanogpt_core", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run
