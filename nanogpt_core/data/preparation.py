"""Preparing an experiment's dataset: ``train.bin``, ``val.bin`` and ``meta.json``.

:func:`prepare_dataset` is the one entry point (``gpt prepare``, ``gpt run``,
``gpt eval``). A dataset plugin only says *what* the documents or examples are
(:class:`~nanogpt_core.data.plugins.DatasetSource`) and names its tokenizer;
this module picks the folder, ``<data_dir>/<plugin>/<variant>/``, returns a
preparation already there whose fingerprint (:mod:`nanogpt_core.data.fingerprints`)
matches, and otherwise has the source prepared: documents by
:mod:`nanogpt_core.data.token_preparation`, instruction-tuning examples by
:mod:`nanogpt_core.data.example_preparation`. ``meta.json`` is written last and
carries the fingerprint, so a folder is either a complete, matching preparation
or is prepared again.

One process prepares a folder at a time: an OS lock beside it
(``.<variant>.lock``) makes a second ``gpt prepare``, or a run sharing the
dataset, wait and then use the result.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nanogpt_core.data.example_preparation import ExamplePlan, plan_examples, write_examples
from nanogpt_core.data.fingerprints import fingerprint, input_files
from nanogpt_core.data.plugins import (
    DatasetSource,
    TokenizerChoice,
    dataset_who,
    is_example_source,
    source_for,
    tagged_folder,
    tokenizer_choice,
)
from nanogpt_core.data.prepared import PreparedData, open_prepared
from nanogpt_core.data.token_preparation import write_tokens
from nanogpt_core.errors import DataError, NanoGPTError
from nanogpt_core.files import free_bytes, remove_stale_temporaries, storage_errors
from nanogpt_core.locks import locked
from nanogpt_core.plugins.options import unstructure

if TYPE_CHECKING:
    from nanogpt_core.config.experiment import ExperimentConfig
    from nanogpt_core.plugins.registry import Plugins


@attrs.frozen
class DataLocation:
    """Where an experiment's data is prepared, and what decides its tokens.

    Attributes:
        folder: ``<data_dir>/<plugin>/<variant>`` (tagged for another tokenizer or,
            for examples, the block size).
        fingerprint: the hash a matching ``meta.json`` carries.
        source: the dataset plugin's source.
        tokenizer: the tokenizer chosen for it.
        examples: the example plan of an example source, else None.
    """

    folder: Path
    fingerprint: str
    source: DatasetSource
    tokenizer: TokenizerChoice
    examples: ExamplePlan | None


def locate_data(config: ExperimentConfig, plugins: Plugins, *, data_dir: Path) -> DataLocation:
    """The experiment's data folder and fingerprint, without reading or writing data.

    An example source's template is built here (it decides the folder).
    """
    plugin = config.dataset.plugin
    source = source_for(config, plugins)
    choice = tokenizer_choice(config, source, plugins)
    folder = data_folder(Path(data_dir), plugin, source, choice)
    plan = extra = None
    if is_example_source(source):
        plan = plan_examples(config, plugins, source)
        folder, extra = plan.folder(folder), plan.fingerprint_extra()
    elif getattr(config, "template", None) is not None:
        raise DataError(
            f"template.plugin: dataset {plugin!r} yields documents, not examples, so a "
            "[template] table does not apply to it; remove the table"
        )
    wanted = fingerprint(plugin, config.dataset.options, choice, extra)
    return DataLocation(folder, wanted, source, choice, plan)


def current_preparation(location: DataLocation) -> PreparedData | None:
    """The preparation at ``location`` if it is complete and up to date, else None."""
    with contextlib.suppress(DataError):
        return _matching(location.folder, location.fingerprint)
    return None


def prepare_dataset(
    config: ExperimentConfig, plugins: Plugins, *, data_dir: Path, force: bool = False
) -> PreparedData:
    """Prepare the experiment's dataset unless an up-to-date preparation exists.

    Another process preparing the same folder is waited for (one line on stderr
    says so) and its result used. With ``force`` the folder is prepared again
    whatever its state, unless it was just prepared by the process waited for.
    An example source (:mod:`nanogpt_core.data.example_preparation`) is cut for
    ``config.model.block_size``.
    """
    plugin = config.dataset.plugin
    location = locate_data(config, plugins, data_dir=data_dir)
    folder, wanted, source, choice = (
        location.folder,
        location.fingerprint,
        location.source,
        location.tokenizer,
    )
    write: Any = write_tokens
    if location.examples is not None:
        write = functools.partial(write_examples, plan=location.examples)
    if not force:
        # Without the lock first, so a finished folder on read-only storage works; a
        # folder some writer is publishing right now is checked again under the lock.
        ready = current_preparation(location)
        if ready is not None:
            return _tidied(ready)
    # Before the lock: a refused preparation leaves no trace, not even a lock file.
    check_room(location, dataset_who(config, plugins))
    with storage_errors(folder), data_lock(folder) as waited:
        if not force or waited:
            ready = _matching(folder, wanted, strict=not force)
            if ready is not None:
                return _tidied(ready)
        return write(
            source,
            folder,
            plugin=plugin,
            fingerprint_=wanted,
            options=unstructure(config.dataset.options),
            downloads=Path(data_dir) / plugin / "downloads",
            tokenizer=choice,
            who=dataset_who(config, plugins),
            inputs=input_files(config.dataset.options) + input_files(choice.options),
        )


def check_room(location: DataLocation, who: str) -> None:
    """Refuse, before writing anything, data that the dataset's estimate says cannot fit.

    The estimate is the dataset plugin's (:mod:`nanogpt_core.data.token_estimates`)
    at 2 bytes a token, the narrowest the ``.bin`` files are stored in; without
    an estimate nothing is refused here (a full disk is still reported in one
    line when it happens, leaving nothing half-written). An estimate that fails
    is no refusal either: the preparation itself then reports the problem in
    its own words (``gpt plan`` reports the estimate's).
    """
    from nanogpt_core.data.token_estimates import estimate_tokens
    from nanogpt_core.train.memory import human_bytes

    try:
        estimate = estimate_tokens(location.source, location.tokenizer.name, who)
    except NanoGPTError:
        return
    free = free_bytes(location.folder)
    if not estimate or free is None:
        return
    tokens = estimate["train"] + estimate["val"]
    needed = 2 * tokens
    if needed > free:
        raise DataError(
            f"{location.folder}: {who} needs about {human_bytes(needed)} for its prepared "
            f"data (an estimated {tokens:,} tokens) but its file system has "
            f"{human_bytes(free)} free; free some space or choose another --data-dir"
        )


def _tidied(data: PreparedData) -> PreparedData:
    """``data``, after removing what dead writers left in its folder (a killed ``--force``).

    Only files whose writer is gone are removed; on read-only storage nothing is.
    """
    with contextlib.suppress(OSError):
        remove_stale_temporaries(data.folder)
    return data


def data_folder(
    data_dir: Path, plugin: str, source: DatasetSource, choice: TokenizerChoice
) -> Path:
    """``<data_dir>/<plugin>/<variant>``; a tokenizer other than the source's own adds a tag.

    The tag (``.<tokenizer>-<hash of its options>``) keeps data prepared with,
    say, a Korean tokenizer.json apart from the default preparation.
    """
    return tagged_folder(Path(data_dir) / plugin / source.variant, choice, source.tokenizer)


@contextlib.contextmanager
def data_lock(folder: Path) -> Iterator[bool]:
    """Hold the lock of a data folder (``.<name>.lock`` beside it); yields whether it waited.

    Waiting is announced once on stderr, naming the holder's pid.
    """
    waited = False

    def on_wait(pid: int | None) -> None:
        nonlocal waited
        waited = True
        holder = f"pid {pid}" if pid else "another process"
        print(f"waiting for {holder}, which is preparing {folder}", file=sys.stderr, flush=True)

    lock = folder.with_name(f".{folder.name}.lock")
    with locked(lock, wait=True, purpose=str(folder), on_wait=on_wait):
        yield waited


def _matching(folder: Path, wanted: str, *, strict: bool = True) -> PreparedData | None:
    """The folder's preparation if its fingerprint is ``wanted``; damage raises when ``strict``."""
    try:
        existing = open_prepared(folder)
    except DataError:
        if strict:
            raise
        return None
    if existing is not None and existing.meta["fingerprint"] == wanted:
        return existing
    return None
