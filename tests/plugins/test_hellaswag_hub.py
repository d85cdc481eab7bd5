"""HellaSwag from the hub: read once per run on the main process, cached, shared, one-line failures.

The machine running the tests is offline, so ``datasets.load_dataset`` is
replaced by a stand-in that serves the real sample rows in the hub's format
(``label`` a string, the extra columns kept) and counts its calls; everything
else (the task, the cache, the Evaluator, the CLI, two processes under
``accelerate launch``) is the real code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt_plugins.evals.hellaswag import HellaSwag, HellaSwagOptions, hub_cache_path

PROBE = Path(__file__).with_name("hellaswag_hub_probe.py")
LIMIT = 12


def hub_rows(shared_data: Path) -> list[dict]:
    """The sample's rows as the hub's ``Rowan/hellaswag`` serves them."""
    sample = shared_data / "hellaswag" / "hellaswag_val_sample.jsonl"
    rows = [json.loads(line) for line in sample.read_text().splitlines()]
    return [{**row, "label": str(row["label"])} for row in rows]


@pytest.fixture
def hub(monkeypatch, tmp_path, shared_data):
    """A counting stand-in for the hub, and a fresh datasets cache under tmp_path."""
    import datasets

    calls: list[tuple] = []
    state = {"offline": False}

    def load_dataset(name, *args, **kwargs):
        calls.append((name, kwargs.get("split")))
        if state["offline"]:
            raise ConnectionError(
                "Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)\n"
                "a second line the user need not see"
            )
        return iter(hub_rows(shared_data))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    # The stand-in "is" at localhost, which resolves offline (the core looks the host up first).
    monkeypatch.setenv("HF_ENDPOINT", "http://localhost")
    return calls, state


def tiny_evaluator(shared_data: Path):
    """A real Evaluator over a small random GPT reading characters of the sample's text."""
    import torch
    from accelerate import Accelerator

    from nanogpt_core import Evaluator
    from nanogpt_core.model.gpt import GPT, GPTConfig
    from nanogpt_plugins.tokenizers.char import CharTokenizer

    tokenizer = CharTokenizer()
    tokenizer.learn(
        " ".join([row["ctx"], *row["endings"]]) for row in hub_rows(shared_data)[:LIMIT]
    )
    torch.manual_seed(0)
    config = GPTConfig(
        block_size=128, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16, bias=True
    )
    return Evaluator(
        model=GPT(config),
        tokenizer=tokenizer,
        accelerator=Accelerator(cpu=True),
        batch_size=4,
        limit=LIMIT,
    )


def test_the_hub_is_read_once_per_run_then_from_the_cache(hub, shared_data):
    calls, _ = hub
    evaluator = tiny_evaluator(shared_data)
    task = HellaSwag(HellaSwagOptions())
    # Three evaluations of one run (the eval callback keeps its task): one hub read.
    results = [task.evaluate(evaluator) for _ in range(3)]
    assert calls == [("Rowan/hellaswag", "validation")]
    assert results[0].n == LIMIT and results[0] == results[1] == results[2]

    cache = hub_cache_path("Rowan/hellaswag", "validation")
    assert cache.name == "Rowan--hellaswag-validation.jsonl"
    # The whole split, written under a temporary name and renamed: nothing else is left.
    assert os.listdir(cache.parent) == [cache.name]
    cached = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(cached) == 500 and set(cached[0]) == {"ctx", "endings", "label"}

    # A later run reads the cache, not the hub, and scores the same rows as the local file.
    again = HellaSwag(HellaSwagOptions()).evaluate(evaluator)
    sample = shared_data / "hellaswag" / "hellaswag_val_sample.jsonl"
    local = HellaSwag(HellaSwagOptions(data=str(sample))).evaluate(evaluator)
    assert len(calls) == 1
    assert again == local == results[0]


def test_hellaswag_reads_the_device_once_per_batch(hub, shared_data, count_host_reads):
    evaluator = tiny_evaluator(shared_data)
    task = HellaSwag(HellaSwagOptions())
    task.evaluate(evaluator)  # the rows are read (and cached) outside the count
    reads = count_host_reads(lambda: task.evaluate(evaluator))
    assert reads == LIMIT // evaluator.batch_size  # not 2 per ending (96), as it was


def test_a_failed_hub_read_is_one_line_and_caches_nothing(hub, shared_data):
    from nanogpt_core import DataError

    calls, state = hub
    state["offline"] = True
    task = HellaSwag(HellaSwagOptions())
    with pytest.raises(DataError) as info:
        task.evaluate(tiny_evaluator(shared_data))
    message = str(info.value)
    assert message.splitlines() == [message]
    assert message.startswith("hellaswag: could not read Rowan/hellaswag from the Hugging Face hub")
    assert "ConnectionError: Couldn't reach 'Rowan/hellaswag'" in message
    assert "pass a local copy with --data hellaswag_val.jsonl" in message
    assert not hub_cache_path("Rowan/hellaswag", "validation").parent.exists()
    assert len(calls) == 1


def test_a_damaged_cache_names_the_file_and_the_fix(hub, shared_data):
    from nanogpt_core import DataError

    calls, _ = hub
    cache = hub_cache_path("Rowan/hellaswag", "validation")
    cache.parent.mkdir(parents=True)
    cache.write_text('{"ctx": "A man", "endings": ["a", "b"]}\n')
    with pytest.raises(DataError) as info:
        HellaSwag(HellaSwagOptions()).evaluate(tiny_evaluator(shared_data))
    (line,) = str(info.value).splitlines()
    assert str(cache) in line and line.endswith(f"delete {cache} to read the hub again")
    assert calls == []


@pytest.mark.slow
def test_the_eval_callback_reads_the_hub_once_per_run(hub, shared_data, session_data_dir, tmp_path):
    from nanogpt_core.config.experiment_file import load_experiment
    from nanogpt_core.plugins.registry import load_plugins
    from nanogpt_core.train.metrics import read_metrics
    from nanogpt_core.train.run import run_experiment

    calls, _ = hub
    stories = shared_data / "tinystories"
    experiment = tmp_path / "hs.toml"
    experiment.write_text(
        f"""
name = "hs"
[dataset]
plugin = "tinystories"
source = "local"
train_files = ["{stories / "derived_train.parquet"}"]
val_files = ["{stories / "derived_validation.jsonl"}"]
[model]
n_layer = 1
n_head = 2
n_embd = 16
block_size = 64
[train]
batch_size = 4
steps_per_epoch = 12
warmup_steps = 2
eval_every = 12
eval_batches = 1
[[callbacks]]
plugin = "eval"
tasks = ["hellaswag"]
every_steps = 4
limit = 4
"""
    )
    plugins = load_plugins(disabled=())
    config = load_experiment(experiment, (), plugins)
    results = tmp_path / "results"
    run_experiment(config, plugins, results_dir=results, data_dir=session_data_dir, progress=False)
    records, _ = read_metrics(results / "hs" / "metrics.jsonl")
    assert [r["step"] for r in records if "eval/hellaswag/acc_norm" in r] == [4, 8, 12]
    # Three evaluations in the run, one read of the hub.
    assert calls == [("Rowan/hellaswag", "validation")]


# -- two processes -------------------------------------------------------------


def launch_eval(ckpt: Path, calls: Path, mode: str, cache: Path, port: int):
    """`gpt eval --task hellaswag` (hub rows) on two CPU processes, with the hub faked."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(port), str(PROBE), str(calls), mode]
    command += ["eval", "--ckpt", str(ckpt), "--task", "hellaswag"]
    command += ["--limit", "16", "--batch-size", "4", "--json"]
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache)}
    # A hang (a rank waiting for one that failed) ends the test here instead of never.
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def exit_statuses(calls: Path) -> list[str | None]:
    """The exit status ``gpt`` chose on each rank (None: it never got that far)."""
    files = [calls / f"rank{rank}.exit" for rank in (0, 1)]
    return [file.read_text() if file.exists() else None for file in files]


@pytest.mark.slow
def test_two_processes_read_the_hub_once_and_fail_together(bpe_checkpoint, shared_data, tmp_path):
    rows = tmp_path / "hub.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in hub_rows(shared_data)))

    calls = tmp_path / "calls"
    ok = launch_eval(bpe_checkpoint, calls, str(rows), tmp_path / "cache", 29551)
    # Both processes finished (exit status 0 from gpt). Not ok.returncode: about
    # one two-process `gpt eval` in five, before this change too, aborts after
    # that in torch's teardown ("terminate called without an active exception"):
    # nothing destroys the gloo process group before the interpreter exits.
    assert exit_statuses(calls) == ["0", "0"], ok.stderr[-3000:]
    # Only the main process asked the hub; the other received the rows from it.
    assert sorted(p.name for p in calls.iterdir()) == ["rank0", "rank0.exit", "rank1.exit"]
    assert (calls / "rank0").read_text().splitlines() == ["Rowan/hellaswag"]
    assert len(list((tmp_path / "cache").rglob("*.jsonl"))) == 1
    two = json.loads(ok.stdout)["tasks"]["hellaswag"]
    # The shared rows are the sample's: the numbers of one process reading the file.
    sample = shared_data / "hellaswag" / "hellaswag_val_sample.jsonl"
    command = [sys.executable, "-m", "nanogpt_core", "eval", "--ckpt", str(bpe_checkpoint)]
    command += ["--task", "hellaswag", "--data", str(sample), "--limit", "16", "--json"]
    one = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert (
        two["n"] == 16 and two["metrics"] == json.loads(one.stdout)["tasks"]["hellaswag"]["metrics"]
    )

    calls = tmp_path / "calls2"
    failed = launch_eval(bpe_checkpoint, calls, "fail", tmp_path / "cache2", 29552)
    assert failed.returncode != 0
    # Only rank 0 asked the hub, and both processes stopped (none left waiting for
    # the other) with the same one line and exit status 2.
    assert sorted(p.name for p in calls.iterdir()) == ["rank0", "rank0.exit", "rank1.exit"]
    assert exit_statuses(calls) == ["2", "2"], failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], failed.stderr[-3000:]
    assert errors[0].startswith("Error: hellaswag: could not read Rowan/hellaswag from the")
    # No traceback from either process (the launcher's own report comes after).
    assert "Traceback" not in failed.stderr.split(errors[0])[0]
    assert not (tmp_path / "cache2").exists()
