"""A plugin of every kind the README of commit b4fbd97 documented, written as it said.

A dataset that defines only ``split_documents(downloads)`` (the README's
alternative to ``documents``), a ``Callback`` subclass with every method of that
README's table, and a command. It imports what that README named:
``hookimpl``, ``option`` and ``Callback`` from ``nanogpt_core``, ``DataError``
from ``nanogpt_core.errors`` and a file reader from ``nanogpt_core.documents``
(deprecated since: a warning line, until API 2.0).
"""

import hashlib
import json
from pathlib import Path

import attrs

from nanogpt_core import Callback, hookimpl, option
from nanogpt_core.documents import read_texts
from nanogpt_core.errors import DataError


@attrs.frozen(kw_only=True)
class WordsOptions:
    """Options of the words dataset."""

    documents: int = option(600, "How many documents to generate.")
    val_percent: int = option(10, "Share of documents held out, by a hash of the text.")
    path: str = option(
        "", "A local .txt file of documents to use instead (read by nanogpt_core.documents)."
    )


class WordsSource:
    """Short sentences of counting words, split while reading by a hash of each one."""

    tokenizer = "char"
    description = "Counting words (compat: b4fbd97 API)"

    def __init__(self, options):
        if not 0 < options.val_percent < 100:
            raise DataError(f"dataset.val_percent: must be 1 to 99, got {options.val_percent}")
        self.options = options
        self.variant = "file" if options.path else f"words{options.documents}"

    def _texts(self):
        if self.options.path:
            yield from read_texts(Path(self.options.path))
            return
        words = ["one", "two", "three", "four", "five", "six", "seven"]
        for i in range(self.options.documents):
            yield " ".join(words[: i % len(words) + 1]) + f" and {i}.\n"

    def split_documents(self, downloads):
        for text in self._texts():
            bucket = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 100
            yield ("val" if bucket < self.options.val_percent else "train"), text


@attrs.frozen(kw_only=True)
class TallyOptions:
    """Options of the tally callback."""

    file: str = option("tally.json", "File under the run's folder to write the tally to.")


class TallyCallback(Callback):
    """Counts every hook call, keeps the counts across a resume and writes them at the end."""

    def __init__(self, options):
        self.options = options
        self.counts = {"train_start": 0, "step_end": 0, "eval_end": 0, "epoch_end": 0}
        self.last_val_loss = None

    def on_train_start(self, state):
        self.counts["train_start"] += 1

    def on_step_end(self, state):
        self.counts["step_end"] += 1

    def on_eval_end(self, state):
        self.counts["eval_end"] += 1
        self.last_val_loss = state.metrics["val_loss"]

    def on_epoch_end(self, state):
        self.counts["epoch_end"] += 1

    def on_train_end(self, state):
        if state.is_main_process:
            record = {
                "counts": self.counts,
                "status": state.status,
                "step": state.step,
                "val_loss": self.last_val_loss,
            }
            (state.paths.root / self.options.file).write_text(json.dumps(record))

    def state_dict(self):
        return {"counts": dict(self.counts), "last_val_loss": self.last_val_loss}

    def load_state_dict(self, d):
        self.counts = dict(d["counts"])
        self.last_val_loss = d["last_val_loss"]


@hookimpl
def register_datasets(register):
    register("compat_words", WordsSource, options=WordsOptions)


@hookimpl
def register_callbacks(register):
    register("compat_tally", TallyCallback, options=TallyOptions, description="Count hook calls.")


@hookimpl
def register_commands(cli):
    @cli.command(name="compat-early")
    def compat_early():
        """Say that the b4fbd97-era command runs."""
        print("compat-early: command ran")
