"""Reading the Hugging Face hub offline: one line at once, none of the hub client's retries."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanogpt_core import DataError, hub_rows

REPO = Path(__file__).resolve().parents[3]
# RFC 2606: a .invalid name never resolves, on any machine.
NOWHERE = "http://hub.nowhere.invalid"


@pytest.fixture
def load_calls(monkeypatch):
    """Count calls of ``datasets.load_dataset`` (it must not be reached offline)."""
    import datasets

    calls: list[str] = []

    def load_dataset(name, *args, **kwargs):
        calls.append(name)
        # What the hub client does before it gives up: warnings through its logger.
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_an_unresolvable_hub_fails_at_once_without_calling_the_client(monkeypatch, load_calls):
    monkeypatch.setenv("HF_ENDPOINT", NOWHERE)
    with pytest.raises(DataError) as refused:
        next(hub_rows("roneneldan/TinyStories", None, "train"))
    message = str(refused.value)
    assert message.startswith("could not read roneneldan/TinyStories from the Hugging Face hub")
    assert "hub.nowhere.invalid cannot be resolved" in message
    assert message.endswith('use source = "local" with downloaded files')
    assert load_calls == []


def test_the_hub_clients_retry_warnings_do_not_reach_the_user(monkeypatch, load_calls, capfd):
    monkeypatch.setenv("HF_ENDPOINT", "http://localhost")  # resolves: the client is asked
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("huggingface_hub").addHandler(handler)
    level = logging.getLogger("huggingface_hub").level
    try:
        with pytest.raises(DataError, match="ConnectionError: Couldn't reach"):
            next(hub_rows("roneneldan/TinyStories", None, "train", hint="try X"))
    finally:
        logging.getLogger("huggingface_hub").removeHandler(handler)
    assert load_calls == ["roneneldan/TinyStories"]
    assert "Retrying" not in capfd.readouterr().err
    assert logging.getLogger("huggingface_hub").level == level  # restored


def test_gpt_prepare_of_a_hub_experiment_offline_is_one_line(tmp_path):
    gpt = str(Path(sys.executable).with_name("gpt"))
    done = subprocess.run(
        [gpt, "prepare", str(REPO / "experiments" / "tinystories.toml"), "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "HF_ENDPOINT": NOWHERE},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "Error: could not read roneneldan/TinyStories from the Hugging Face hub "
        "(hub.nowhere.invalid cannot be resolved: Name or service not known; offline?); "
        'use source = "local" with downloaded files'
    ]


@pytest.mark.parametrize(
    ("experiment", "dataset"),
    [("tinystories_cpu.toml", "roneneldan/TinyStories"), ("alpaca_cpu.toml", "tatsu-lab/alpaca")],
)
def test_gpt_run_of_a_capped_cpu_demo_offline_is_one_line_at_once(tmp_path, experiment, dataset):
    gpt = str(Path(sys.executable).with_name("gpt"))
    start = time.monotonic()
    done = subprocess.run(
        [gpt, "run", str(REPO / "experiments" / "cpu" / experiment),
         "--data-dir", str(tmp_path / "data"), "--results-dir", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "HF_ENDPOINT": NOWHERE},
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"Error: could not read {dataset} from the Hugging Face hub "
        "(hub.nowhere.invalid cannot be resolved: Name or service not known; offline?); "
        'use source = "local" with downloaded files'
    ]
    # Under 2 s here: no retries with back-off (the hub client's take about 20 s).
    assert elapsed < 15
