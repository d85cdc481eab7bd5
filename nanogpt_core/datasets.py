"""Turning a dataset plugin's documents into ``train.bin``, ``val.bin`` and ``meta.json``.

A dataset plugin only says *what* the documents are (a :class:`DatasetSource`)
and names its tokenizer; this module tokenizes them with a registered tokenizer
plugin, streams the tokens to disk and publishes the result atomically under
``<data_dir>/<plugin>/<variant>/``. ``meta.json`` is written last and carries a
fingerprint of the options, the tokenizer and the input files' identity, so a
folder is either a complete, matching preparation or is prepared again.

One process prepares a folder at a time: an OS lock beside it
(``.<variant>.lock``) makes a second ``gpt prepare``, or a run sharing the
dataset, wait and then use the result.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import numpy as np

from nanogpt_core.errors import (
    ConfigError,
    DataError,
    NanoGPTError,
    PluginError,
    PluginFault,
)
from nanogpt_core.files import (
    atomic_write_text,
    fsync_dir,
    remove_stale_temporaries,
    storage_errors,
    temporary_path,
)
from nanogpt_core.locks import locked
from nanogpt_core.options import OptionProblems, path_fields, structure, suggest, unstructure
from nanogpt_core.tokenizers import Tokenizer, encode_documents, learn_if_needed

if TYPE_CHECKING:
    from nanogpt_core.experiment_config import ExperimentConfig
    from nanogpt_core.plugins import Plugins, Registration

SPLITS = ("train", "val")
# 2: the fingerprint covers the tokenizer and the input files' identity.
FORMAT_VERSION = 2
DTYPES = ("uint16", "uint32")
# Documents are tokenized in batches of about this many characters: large enough
# to keep worker processes busy, small enough to bound memory.
BATCH_CHARS = 500_000
# Input files smaller than this are also hashed, so an edit that keeps the size
# and the modification time (a copy with `cp -p`, a coarse clock) is still seen.
HASHED_FILE_BYTES = 1 << 20
VARIANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class DatasetSource(Protocol):
    """What a dataset plugin's factory returns.

    Attributes:
        variant: the folder under ``<data_dir>/<plugin>/`` (e.g. ``"tiny-char"``);
            letters, digits, ``.``, ``_``, ``-`` and ``+``. Options that change the
            tokens but not the variant are caught by the fingerprint.
        tokenizer: the name of a registered tokenizer (``"char"``, ``"gpt2"``, ...);
            an experiment's ``[tokenizer]`` table overrides it.
        description: one line about the source, recorded in ``meta.json``.
    """

    variant: str
    tokenizer: str
    description: str

    def documents(self, split: str, downloads: Path) -> Iterable[str]:
        """Yield the documents of ``split`` (``"train"`` or ``"val"``), in order.

        :param downloads: a folder the plugin may cache downloads in.

        A source that decides the split while reading (holding out documents by
        hash, say) may also define ``split_documents(downloads)`` yielding
        ``(split, document)`` pairs in one pass; it is then used instead.
        Raise :class:`~nanogpt_core.errors.DataError` for bad input; any other
        exception is reported as a fault of the plugin (exit status 1).
        """


@attrs.frozen
class PreparedData:
    """A prepared dataset folder and its (checked) ``meta.json``."""

    folder: Path
    meta: dict[str, Any]

    @property
    def dtype(self) -> np.dtype:
        """The token dtype of the ``.bin`` files."""
        return np.dtype(self.meta["dtype"])

    @property
    def tokenizer(self) -> dict[str, Any]:
        """The tokenizer description."""
        return self.meta["tokenizer"]

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary (before any padding)."""
        return int(self.meta["tokenizer"]["vocab_size"])

    def split_path(self, split: str) -> Path:
        """Path of ``train.bin`` or ``val.bin``."""
        return self.folder / f"{split}.bin"

    def tokens(self, split: str) -> int:
        """How many tokens ``split`` (``"train"`` or ``"val"``) holds."""
        return int(self.meta["splits"][split]["tokens"])

    @property
    def kind(self) -> str:
        """``"tokens"`` (a stream of documents) or ``"examples"`` (prompt/response pairs)."""
        return self.meta.get("kind", "tokens")

    @property
    def template(self) -> dict[str, Any] | None:
        """The template's description for examples; None for tokens."""
        return self.meta.get("template")

    def examples(self, split: str) -> np.ndarray:
        """The (N, 3) int64 rows ``start, length, response_start`` of ``split``, memory-mapped."""
        if self.kind != "examples":
            raise DataError(f"{self.folder} holds tokens, not examples (no {split}.examples.npy)")
        return np.load(self.folder / f"{split}.examples.npy", mmap_mode="r")


@attrs.frozen
class PluginChoice:
    """The tokenizer or template a preparation uses: registered name, registration, options.

    ``from_table`` is true when the experiment's ``[tokenizer]`` or ``[template]``
    table chose it rather than the dataset source.
    """

    name: str
    registration: Registration
    options: Any
    from_table: bool = False


TokenizerChoice = PluginChoice


# Fingerprints.


def file_identity(path: Path) -> dict[str, Any]:
    """A file's resolved path, size and modification time, and a sha256 when it is small."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    identity: dict[str, Any] = {
        "path": str(resolved),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    if resolved.is_file() and stat.st_size < HASHED_FILE_BYTES:
        identity["sha256"] = hashlib.sha256(resolved.read_bytes()).hexdigest()
    return identity


def input_files(options: Any) -> list[dict[str, Any]]:
    """The identity of every file the path options of ``options`` name (globs expanded).

    Options declared with ``option(..., path=True)`` hold a path or a list of
    paths and globs; a pattern that matches nothing is recorded as missing (the
    source itself reports it when it reads).
    """
    found: list[dict[str, Any]] = []
    for name in path_fields(type(options)):
        value = getattr(options, name)
        patterns = [value] if isinstance(value, str) else list(value or [])
        for pattern in patterns:
            matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
            if not matches:
                found.append({"option": name, "pattern": pattern, "missing": True})
            for match in matches:
                try:
                    found.append({"option": name, **file_identity(Path(match))})
                except OSError as exc:
                    found.append({"option": name, "pattern": match, "error": exc.strerror})
    return found


def fingerprint(
    plugin: str,
    options: Any,
    tokenizer: TokenizerChoice | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """A hash of everything that decides the prepared tokens.

    The dataset's options, the tokenizer's name and options, the identity of
    every input file named by a path option of either (:func:`input_files`),
    and ``extra`` (for examples: the template and the block size).
    """
    payload: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "plugin": plugin,
        "options": unstructure(options),
        "inputs": input_files(options),
    }
    if tokenizer is not None:
        payload["tokenizer"] = {
            "name": tokenizer.name,
            "options": unstructure(tokenizer.options),
            "inputs": input_files(tokenizer.options),
        }
    if extra:
        payload.update(extra)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits (GPT-2's 50,257 does), else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


# Reading a prepared folder.


def open_prepared(folder: Path) -> PreparedData | None:
    """The prepared data in ``folder``, or None when no preparation finished there.

    :raises DataError: ``meta.json`` parses but is not what a preparation
        writes (a key missing or of the wrong type, a dtype other than
        uint16/uint32), or it contradicts the ``.bin`` files' sizes.
    """
    meta_path = Path(folder) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        # meta.json is written last: without a readable one nothing finished here.
        return None
    data = PreparedData(Path(folder), meta)
    check_meta(data)
    return data


def _meta_problem(data: PreparedData, key: str, problem: str) -> DataError:
    return DataError(
        f"{data.folder / 'meta.json'}: {key}: {problem}; prepare again with "
        f"`gpt prepare EXPERIMENT --force` or delete {data.folder}"
    )


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def check_meta(data: PreparedData) -> None:
    """Refuse a ``meta.json`` with the wrong structure or one the ``.bin`` sizes contradict."""
    meta = data.meta
    if not isinstance(meta, dict):
        raise _meta_problem(data, "(top level)", "expected a JSON object")
    if meta.get("dtype") not in DTYPES:
        raise _meta_problem(data, "dtype", f"expected uint16 or uint32, got {meta.get('dtype')!r}")
    tokenizer = meta.get("tokenizer")
    if not isinstance(tokenizer, dict):
        raise _meta_problem(data, "tokenizer", "expected a table with 'kind' and 'vocab_size'")
    if not isinstance(tokenizer.get("kind"), str) or not tokenizer["kind"]:
        raise _meta_problem(data, "tokenizer.kind", "expected a tokenizer name")
    vocab = tokenizer.get("vocab_size")
    if type(vocab) is not int or vocab <= 0:
        raise _meta_problem(
            data, "tokenizer.vocab_size", f"expected a positive integer, got {vocab!r}"
        )
    if np.iinfo(np.dtype(meta["dtype"])).max < vocab - 1:
        raise _meta_problem(
            data, "dtype", f"{meta['dtype']} cannot hold the ids of a {vocab:,}-token vocabulary"
        )
    if not isinstance(meta.get("fingerprint"), str):
        raise _meta_problem(data, "fingerprint", "expected a string")
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        raise _meta_problem(data, "splits", "expected a table with 'train' and 'val'")
    for split in SPLITS:
        counts = splits.get(split)
        if not isinstance(counts, dict) or not _is_count(counts.get("tokens")):
            raise _meta_problem(
                data, f"splits.{split}.tokens", "expected a count of tokens (an integer, 0 or more)"
            )
    for split in SPLITS:
        _check_bin_size(data, split)
    kind = meta.get("kind", "tokens")
    if kind not in ("tokens", "examples"):
        raise _meta_problem(data, "kind", f'expected "tokens" or "examples", got {kind!r}')
    if kind == "examples":
        from nanogpt_core.examples import check_examples_meta

        check_examples_meta(data, lambda key, problem: _meta_problem(data, key, problem))


def _check_bin_size(data: PreparedData, split: str) -> None:
    path = data.split_path(split)
    expected = data.tokens(split) * data.dtype.itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _meta_problem(
            data,
            f"splits.{split}.tokens",
            f"says {data.tokens(split):,} tokens but {path} is missing",
        ) from None
    if size != expected:
        raise _meta_problem(
            data,
            f"splits.{split}.tokens",
            f"{data.tokens(split):,} {data.dtype.name} tokens are {expected:,} bytes, "
            f"but {path} has {size:,}",
        )


# The source and its tokenizer.


def _who(kind: str, name: str, plugin: str) -> str:
    """``dataset 'x' (plugin 'y')``, or ``dataset plugin 'x'`` when the names agree."""
    return f"{kind} plugin {name!r}" if name == plugin else f"{kind} {name!r} (plugin {plugin!r})"


@contextlib.contextmanager
def plugin_call(who: str, method: str) -> Iterator[None]:
    """Report an exception a plugin raises inside the block as one :class:`PluginFault` line.

    A :class:`NanoGPTError` (bad input the plugin reported well) passes unchanged;
    the original exception is chained, so ``--debug`` shows its traceback.
    """
    try:
        yield
    except NanoGPTError:
        raise
    except Exception as exc:
        raise PluginFault(f"{who} failed in {method}: {type(exc).__name__}: {exc}") from exc


def source_for(config: ExperimentConfig, plugins: Plugins) -> DatasetSource:
    """Instantiate the experiment's dataset plugin and check what its factory returned."""
    name = config.dataset.plugin
    registration = plugins.datasets()[name]
    who = _who("dataset", name, registration.plugin)
    with plugin_call(who, "its factory"):
        source = registration.factory(config.dataset.options)
    check_source(source, who)
    return source


def check_source(source: Any, who: str) -> None:
    """A dataset source has a usable ``variant``, ``tokenizer``, ``description`` and ``documents``.

    An example source (one with a ``template``) has ``examples`` instead of ``documents``.
    """
    from nanogpt_core.examples import check_example_source, is_example_source

    missing = [
        f"{attr} (a string)"
        for attr in ("variant", "tokenizer", "description")
        if not isinstance(getattr(source, attr, None), str)
    ]
    if is_example_source(source):
        missing += check_example_source(source)
    elif not callable(getattr(source, "documents", None)):
        missing.append("documents (a method)")
    if missing:
        raise PluginError(
            f"{who}: its factory returned {type(source).__name__}, which lacks "
            f"{', '.join(missing)}; see nanogpt_core.DatasetSource"
        )
    if not VARIANT_PATTERN.fullmatch(source.variant) or ".." in source.variant:
        raise PluginError(
            f"{who}: variant {source.variant!r} is not usable as a folder name "
            "(use letters, digits, '.', '_', '-' and '+')"
        )


def plugin_choice(
    kind: str, config: ExperimentConfig, source: DatasetSource, plugins: Plugins
) -> PluginChoice:
    """The ``kind`` (``"tokenizer"`` or ``"template"``) to prepare with.

    The experiment's ``[kind]`` table when it has one, else the name the source
    gives in its attribute of that name, with that plugin's default options.
    """
    registry = plugins.registry(kind)
    spec = getattr(config, kind, None)
    if spec is not None:
        name, where = spec.plugin, f"{kind}.plugin"
    else:
        name = getattr(source, kind)
        has_option = hasattr(config.dataset.options, kind)
        where = f"dataset.{kind}" if has_option else f"dataset {config.dataset.plugin!r}"
    registration = registry.get(name)
    if registration is None:
        installed = ", ".join(sorted(registry)) or "none"
        raise DataError(
            f"{where}: no {kind} named {name!r}{suggest(name, list(registry))}; "
            f"installed: {installed}"
        )
    if spec is not None:
        return PluginChoice(name, registration, _table_options(kind, spec, registration), True)
    return PluginChoice(name, registration, _default_options(kind, registration, name, where))


def tokenizer_choice(
    config: ExperimentConfig, source: DatasetSource, plugins: Plugins
) -> TokenizerChoice:
    """The tokenizer to prepare with: the ``[tokenizer]`` table's, else the source's."""
    return plugin_choice("tokenizer", config, source, plugins)


def _table_options(kind: str, spec: Any, registration: Registration) -> Any:
    """The ``[kind]`` table's options (structured here if config loading did not)."""
    if not isinstance(spec.options, dict):
        return spec.options
    try:
        return structure(spec.options, registration.options, kind)
    except OptionProblems as exc:
        raise ConfigError(exc.problems) from None


def _default_options(kind: str, registration: Registration, name: str, where: str) -> Any:
    """The plugin's default options; one that requires some asks for a ``[kind]`` table."""
    required = [f.name for f in attrs.fields(registration.options) if f.default is attrs.NOTHING]
    if required:
        raise DataError(
            f"{where}: {kind} {name!r} needs {', '.join(required)}: add a [{kind}] table "
            f'with plugin = "{name}" and {required[0]} = ...'
        )
    return registration.options()


def data_folder(
    data_dir: Path, plugin: str, source: DatasetSource, choice: TokenizerChoice
) -> Path:
    """``<data_dir>/<plugin>/<variant>``; a tokenizer other than the source's own adds a tag.

    The tag (``.<tokenizer>-<hash of its options>``) keeps data prepared with,
    say, a Korean tokenizer.json apart from the default preparation.
    """
    folder = Path(data_dir) / plugin / source.variant
    if not choice.from_table:
        return folder
    options = unstructure(choice.options)
    try:
        defaults = unstructure(choice.registration.options())
    except Exception:  # required options: there is no default to compare with
        defaults = None
    if choice.name == source.tokenizer and options == defaults:
        return folder
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    return folder.with_name(f"{source.variant}.{choice.name}-{digest}")


def make_tokenizer(choice: TokenizerChoice) -> Tokenizer:
    """A fresh tokenizer from its registration and options."""
    with plugin_call(_who("tokenizer", choice.name, choice.registration.plugin), "its factory"):
        return choice.registration.factory(choice.options)


def _check_tokenizer(tokenizer: Any, choice: TokenizerChoice) -> dict[str, Any]:
    """The tokenizer's description, after checking it names this tokenizer and a vocabulary."""
    who = _who("tokenizer", choice.name, choice.registration.plugin)
    with plugin_call(who, "description"):
        description = tokenizer.description()
    if not isinstance(description, dict) or description.get("kind") != choice.name:
        kind = description.get("kind") if isinstance(description, dict) else description
        raise PluginError(
            f"{who}: description() must return a dict whose 'kind' is {choice.name!r} "
            f"(the registered name), got {kind!r}"
        )
    vocab = getattr(tokenizer, "vocab_size", None)
    if type(vocab) is not int or vocab <= 0 or description.get("vocab_size") != vocab:
        raise PluginError(
            f"{who}: vocab_size must be a positive integer, also in its description; got {vocab!r}"
        )
    return description


# Preparing.


def prepare_dataset(
    config: ExperimentConfig, plugins: Plugins, *, data_dir: Path, force: bool = False
) -> PreparedData:
    """Prepare the experiment's dataset unless an up-to-date preparation exists.

    Another process preparing the same folder is waited for (one line on stderr
    says so) and its result used. With ``force`` the folder is prepared again
    whatever its state, unless it was just prepared by the process waited for.
    An example source (:mod:`nanogpt_core.examples`) is cut for ``config.model.block_size``.
    """
    plugin = config.dataset.plugin
    source = source_for(config, plugins)
    choice = tokenizer_choice(config, source, plugins)
    folder = data_folder(Path(data_dir), plugin, source, choice)
    # examples imports this module: import it here, not at the top.
    from nanogpt_core.examples import is_example_source, plan_examples, write_examples

    write: Any = write_prepared
    extra = None
    if is_example_source(source):
        plan = plan_examples(config, plugins, source)
        folder, extra = plan.folder(folder), plan.fingerprint_extra()
        write = functools.partial(write_examples, plan=plan)
    elif getattr(config, "template", None) is not None:
        raise DataError(
            f"template.plugin: dataset {plugin!r} yields documents, not examples, so a "
            "[template] table does not apply to it; remove the table"
        )
    wanted = fingerprint(plugin, config.dataset.options, choice, extra)
    if not force:
        # Without the lock first, so a finished folder on read-only storage works; a
        # folder some writer is publishing right now is checked again under the lock.
        with contextlib.suppress(DataError):
            ready = _matching(folder, wanted)
            if ready is not None:
                return ready
    with storage_errors(folder), data_lock(folder) as waited:
        if not force or waited:
            ready = _matching(folder, wanted, strict=not force)
            if ready is not None:
                return ready
        return write(
            source,
            folder,
            plugin=plugin,
            fingerprint_=wanted,
            options=unstructure(config.dataset.options),
            downloads=Path(data_dir) / plugin / "downloads",
            tokenizer=choice,
            who=_who("dataset", plugin, plugins.datasets()[plugin].plugin),
            inputs=input_files(config.dataset.options) + input_files(choice.options),
        )


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


def split_stream(
    source: DatasetSource, downloads: Path, who: str = "dataset source"
) -> Iterator[tuple[str, str]]:
    """``(split, document)`` pairs: one pass when the source offers it, else train then val.

    What the source raises (other than a :class:`DataError`) becomes one
    :class:`PluginFault` line naming ``who`` and the method.
    """
    one_pass = getattr(source, "split_documents", None)
    if one_pass is not None:
        with plugin_call(who, "split_documents"):
            for pair in one_pass(downloads):
                yield _checked_pair(pair, who)
        return
    for split in SPLITS:
        with plugin_call(who, "documents"):
            for document in source.documents(split, downloads):
                yield _checked_pair((split, document), who)


def _checked_pair(pair: Any, who: str) -> tuple[str, str]:
    if not (isinstance(pair, tuple) and len(pair) == 2 and pair[0] in SPLITS):
        raise PluginFault(
            f"{who} yielded {pair!r:.60}; split_documents must yield (split, text) with split "
            '"train" or "val"'
        )
    if not isinstance(pair[1], str):
        raise PluginFault(
            f"{who} yielded a {type(pair[1]).__name__} document; documents must be text"
        )
    return pair


Batch = tuple[str, list[str]]


def _document_batches(
    stream: Iterable[tuple[str, str]], counts: dict[str, dict[str, int]]
) -> Iterator[Batch]:
    """Group each split's documents into batches of about BATCH_CHARS characters."""
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for split, document in stream:
        counts[split]["documents"] += 1
        counts[split]["characters"] += len(document)
        pending[split].append(document)
        sizes[split] += len(document)
        if sizes[split] >= BATCH_CHARS:
            yield split, pending[split]
            pending[split], sizes[split] = [], 0
    for split in SPLITS:
        if pending[split]:
            yield split, pending[split]


# Worker processes. Each is forked with the tokenizer already built (fork copies
# it); with spawn, initargs pickle it.
_WORKER_TOKENIZER: Any = None


def _start_worker(parent_pid: int, tokenizer: Tokenizer) -> None:
    """Pool initializer: die with the parent, let go of its output, ignore Ctrl-C."""
    if sys.platform.startswith("linux"):
        # The kernel kills this worker when the parent dies, even by SIGKILL.
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    # A worker must not keep a caller's pipes open (`gpt prepare | tee log` would
    # never see EOF if the parent were killed); results travel through the pool.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    # Ctrl-C reaches the whole process group; the parent alone decides what to do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(texts: list[str]) -> np.ndarray:
    return encode_documents(_WORKER_TOKENIZER, texts)


def _encode_batches(
    tokenizer: Tokenizer,
    stream: Iterable[tuple[str, str]],
    counts: dict[str, dict[str, int]],
    who: str,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(split, token ids)`` a batch at a time, each split's batches in order."""
    batches = _document_batches(stream, counts)
    first = next(batches, None)
    second = next(batches, None) if first is not None else None
    if not getattr(tokenizer, "parallel", False) or second is None:
        # In-process: the tokenizer does its own threading (Hugging Face), or the
        # input is so small that worker processes would cost more than they save.
        for split, batch in itertools.chain(filter(None, [first, second]), batches):
            with plugin_call(who, "encode"):
                ids = encode_documents(tokenizer, batch)
            yield split, ids
        return
    yield from _encode_in_pool(tokenizer, itertools.chain([first, second], batches), who)


def _encode_in_pool(
    tokenizer: Tokenizer, batches: Iterable[Batch], who: str
) -> Iterator[tuple[str, np.ndarray]]:
    """Encode in worker processes, keeping only a few batches in flight so memory stays bounded."""
    workers = max(1, os.cpu_count() or 1)
    # fork where there is one: spawn would re-import the caller's __main__.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_start_worker,
        initargs=(os.getpid(), tokenizer),
    )
    pending: deque[tuple[str, Future[np.ndarray]]] = deque()
    try:
        for split, batch in batches:
            pending.append((split, pool.submit(_encode_in_worker, batch)))
            if len(pending) >= 4 * workers:
                yield _result(pending.popleft(), who)
        while pending:
            yield _result(pending.popleft(), who)
    except BaseException:
        # Ctrl-C, a fault, or the consumer gave up: drop the queued batches rather
        # than encode them all before stopping.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _result(item: tuple[str, Future[np.ndarray]], who: str) -> tuple[str, np.ndarray]:
    split, future = item
    try:
        with plugin_call(who, "encode (in a worker process)"):
            return split, future.result()
    except BrokenProcessPool as exc:
        raise NanoGPTError(
            f"a tokenizer worker process died ({exc}); out of memory? run `gpt prepare` again"
        ) from exc


def write_prepared(
    source: DatasetSource,
    folder: Path,
    *,
    plugin: str,
    fingerprint_: str,
    options: dict[str, Any],
    downloads: Path,
    tokenizer: TokenizerChoice,
    who: str | None = None,
    inputs: list[dict[str, Any]] | None = None,
) -> PreparedData:
    """Tokenize ``source`` into ``folder``, publishing the files only when all are done.

    :param who: how messages name the dataset plugin (``dataset plugin 'x'``).
    :param inputs: the input files' identities, recorded in ``meta.json``.
    """
    who = who or _who("dataset", plugin, plugin)
    tokenizer_who = _who("tokenizer", tokenizer.name, tokenizer.registration.plugin)
    with storage_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        downloads.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    encoder = make_tokenizer(tokenizer)
    with plugin_call(tokenizer_who, "learn"):
        learn_if_needed(encoder, (doc for _, doc in split_stream(source, downloads, who)))
    description = _check_tokenizer(encoder, tokenizer)
    dtype = np.dtype(token_dtype(encoder.vocab_size))
    counts = {split: {"documents": 0, "characters": 0, "tokens": 0} for split in SPLITS}
    batches = _encode_batches(encoder, split_stream(source, downloads, who), counts, tokenizer_who)
    with storage_errors(folder):
        _write_splits(folder, batches, counts, dtype, encoder.vocab_size, tokenizer_who)
    for split in SPLITS:
        if counts[split]["tokens"] == 0:
            _discard(folder)
            raise DataError(f"dataset {plugin!r}: the {split} split is empty (no text found)")
    _publish(folder)
    meta = {
        "format": FORMAT_VERSION,
        "plugin": plugin,
        "variant": source.variant,
        "description": source.description,
        "fingerprint": fingerprint_,
        "options": options,
        "tokenizer_options": {"name": tokenizer.name, **unstructure(tokenizer.options)},
        "inputs": inputs or [],
        "tokenizer": description,
        "dtype": dtype.name,
        "splits": counts,
    }
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return PreparedData(folder, meta)


def _write_splits(
    folder: Path,
    batches: Iterator[tuple[str, np.ndarray]],
    counts: dict[str, dict[str, int]],
    dtype: np.dtype,
    vocab_size: int,
    tokenizer_who: str,
) -> None:
    """Stream the batches into temporary ``.bin`` files (renamed by :func:`_publish`)."""
    from tqdm import tqdm

    temporaries = {split: temporary_path(folder / f"{split}.bin") for split in SPLITS}
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.closing(batches))
            # The bar before the files: a Ctrl-C the moment they appear then never
            # lands inside tqdm's constructor (whose half-built object complains on exit).
            bar = stack.enter_context(
                tqdm(desc="preparing", unit=" docs", delay=2, leave=False, disable=None)
            )
            outs = {split: stack.enter_context(temporaries[split].open("wb")) for split in SPLITS}
            for split, ids in batches:
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise PluginFault(
                        f"{tokenizer_who} produced id {int(ids.max())} outside its "
                        f"vocabulary of {vocab_size:,}"
                    )
                # file.write, not ndarray.tofile: tofile loses the errno of a full disk.
                outs[split].write(ids.astype(dtype).tobytes())
                counts[split]["tokens"] += len(ids)
                bar.update(sum(c["documents"] for c in counts.values()) - bar.n)
                bar.set_postfix(train=counts["train"]["tokens"], val=counts["val"]["tokens"])
            for out in outs.values():
                out.flush()
                os.fsync(out.fileno())
    except BaseException:
        _discard(folder)
        raise


def _discard(folder: Path) -> None:
    """Remove this process's temporary ``.bin`` files."""
    for split in SPLITS:
        temporary_path(folder / f"{split}.bin").unlink(missing_ok=True)


def _publish(folder: Path) -> None:
    """Rename the finished temporaries into place; ``meta.json`` (written next) seals it.

    The old meta goes first so a crash mid-way never pairs old meta with new tokens.
    """
    try:
        with storage_errors(folder):
            (folder / "meta.json").unlink(missing_ok=True)
            for split in SPLITS:
                os.replace(temporary_path(folder / f"{split}.bin"), folder / f"{split}.bin")
            fsync_dir(folder)
    finally:
        _discard(folder)
