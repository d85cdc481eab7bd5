"""FineWeb-Edu samples by row group: reading only what is kept, from local folders and the hub.

The corpus is written here: four parquet files of twenty row groups of a hundred
pages each, with FineWeb-Edu's columns. Its texts are random words and its
``token_count`` is their word count (a stand-in: the plugin trusts the column, as
it does FineWeb-Edu's GPT-2 counts). Bytes are counted by a file system whose
files fetch byte ranges the way ``HfFileSystem``'s do (an fsspec buffered file
whose ``_fetch_range`` is one HTTP range request there, one counted read here).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractBufferedFile

from nanogpt_core import DataError, OptionValueError, gpt2_encoding
from nanogpt_core.data.fingerprints import fingerprint
from nanogpt_plugins.datasets import fineweb, row_groups
from nanogpt_plugins.datasets.fineweb import HUB_REVISION, FineWebOptions, FineWebSource

REPO = Path(__file__).resolve().parents[2]
FILES, GROUPS, ROWS = 4, 20, 100
NAMES = [f"{i:03d}_00000.parquet" for i in range(FILES)]
HUB_ROOT = f"/datasets/HuggingFaceFW/fineweb-edu@{HUB_REVISION}/sample/10BT"
# RFC 2606: a .invalid name never resolves, on any machine.
NOWHERE = "http://hub.nowhere.invalid"


class CountingFile(AbstractBufferedFile):
    """A file read in byte ranges, each one counted, as ``HfFileSystemFile`` reads by HTTP."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        data = self.fs.raw_range(self.path, start, end)
        self.fs.fetched += len(data)
        self.fs.requests += 1
        return data


def counting(base: type) -> type:
    """A subclass of the fsspec file system ``base`` whose reads go through :class:`CountingFile`."""

    class Counting(base):
        cachable = False  # a fresh instance, and fresh counters, each time

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.fetched = self.requests = 0

        def _open(self, path, mode="rb", block_size=None, **kwargs):
            if mode != "rb":
                return super()._open(path, mode, block_size=block_size, **kwargs)
            # fsspec's defaults, as HfFileSystem's: 5 MB blocks read ahead unless told otherwise.
            return CountingFile(self, path, mode, block_size=block_size or 5 * 2**20, **kwargs)

        def raw_range(self, path: str, start: int, end: int) -> bytes:
            with super()._open(path, "rb") as handle:
                handle.seek(start)
                return handle.read(end - start)

    return Counting


def page(rng: random.Random, words: list[str], number: int) -> dict:
    """One row with FineWeb-Edu's columns; the text is random words."""
    text = " ".join(rng.choice(words) for _ in range(rng.randint(40, 120)))
    score = rng.uniform(2.5, 5.0)
    return {
        "text": text,
        "id": f"<urn:uuid:{rng.getrandbits(128):032x}>",
        "dump": "CC-MAIN-2024-10",
        "url": f"https://example.org/{rng.getrandbits(64):x}/{'/'.join(rng.sample(words, 8))}",
        "file_path": f"s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/{number}.warc.gz",
        "language": "en",
        "language_score": rng.uniform(0.6, 1.0),
        "token_count": len(text.split()),
        "score": score,
        "int_score": round(score),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of FILES parquet files of GROUPS row groups of ROWS pages each."""
    folder = tmp_path_factory.mktemp("fineweb") / "sample" / "10BT"
    folder.mkdir(parents=True)
    rng = random.Random(20240610)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(4000)]  # fmt: skip
    for number, name in enumerate(NAMES):
        rows = [page(rng, words, number * GROUPS * ROWS + i) for i in range(GROUPS * ROWS)]
        # zstd: snappy stores some pages of random words uncompressed and others not, which
        # spreads the groups' sizes by 10 %; zstd compresses them evenly, as it does real text.
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, folder / name, row_group_size=ROWS, compression="zstd")
    return folder


def rows_by_text(folder: Path) -> dict[str, dict]:
    return {r["text"]: r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}  # fmt: skip


def scan(folder: Path) -> tuple[row_groups.Scan, int]:
    """The corpus's row groups, and the bytes it takes to read the footers."""
    scanner = counting(LocalFileSystem)()
    files = [(str(folder / name), name) for name in NAMES]
    return row_groups.scan(scanner, files, ["text"], ["token_count"]), scanner.fetched


def split_docs(options: FineWebOptions, tmp_path: Path) -> list[tuple[str, str]]:
    return list(FineWebSource(options).split_documents(tmp_path))


def local(folder: Path, **options) -> FineWebOptions:
    options = {"val_tokens": 500, **options}
    return FineWebOptions(source="local", train_files=[str(folder / "*.parquet")], **options)


@pytest.fixture
def counted(monkeypatch):
    """Read parquet through a counting file system over the disk; returns the list of those made."""
    made = []

    def filesystem(source):
        assert source == "local"
        made.append(counting(LocalFileSystem)())
        return made[-1]

    monkeypatch.setattr(fineweb, "filesystem", filesystem)
    return made


def test_bytes_read_are_proportional_to_the_fraction(corpus, counted, tmp_path):
    """Bytes fetched = every footer once + the chosen groups' text and token_count chunks.

    Tolerance: 10 % of the proportional part. Groups are chosen by rows (all
    equal here, and each fraction below is a whole number of the 80 groups), so
    the share of bytes differs from the fraction only by how long the chosen
    groups' pages happen to be: their compressed sizes spread by 3 %, so four
    groups' total by under 2 %.
    There is no read-ahead to allow for: a chunk is fetched as one exact range
    (with fsspec's default 5 MB read-ahead, every read here would fetch the rest
    of the file, and this test fails).
    """
    files = [(str(corpus / name), name) for name in NAMES]
    scanned, footers = scan(corpus)
    everything = sum(os.path.getsize(p) for p, _ in files)
    assert footers < 0.1 * everything
    # Only text and token_count are read: their chunks are under 3/4 of the files.
    chunks = {"text": 0, "token_count": 0}
    for path, _ in files:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                column = meta.row_group(g).column(c)
                if column.path_in_schema in chunks:
                    chunks[column.path_in_schema] += column.total_compressed_size
    assert sum(chunks.values()) == sum(g.bytes for g in scanned.groups)
    assert sum(chunks.values()) < 0.75 * everything

    def fetched(fraction):
        split_docs(local(corpus, fraction=fraction), tmp_path)
        return counted[-1].fetched - footers

    whole = fetched(1.0)
    # Every group's two chunks, and the columns between them where pyarrow merges two
    # reads across a gap under 8 KB (here: 100 rows of ids and urls; groups of a
    # thousand real pages leave gaps far larger).
    assert sum(chunks.values()) <= whole <= 1.05 * sum(chunks.values())
    for fraction in (0.05, 0.1, 0.25, 0.5):
        assert fetched(fraction) / whole == pytest.approx(fraction, rel=0.1), fraction


def test_the_sample_is_the_same_whatever_the_file_order(corpus, tmp_path):
    by_glob = split_docs(local(corpus, fraction=0.2), tmp_path)
    listed = FineWebOptions(
        source="local",
        train_files=[str(corpus / name) for name in reversed(NAMES)],
        val_tokens=500,
        fraction=0.2,
    )
    copy = tmp_path / "elsewhere"
    shutil.copytree(corpus, copy)
    # The same documents, split the same way, in the same order.
    assert by_glob == split_docs(listed, tmp_path) == split_docs(local(copy, fraction=0.2), tmp_path)  # fmt: skip
    kept = [text for _, text in by_glob]
    assert len(kept) == 0.2 * FILES * GROUPS * ROWS
    # Whole row groups of every file, not the first files' groups.
    rows = rows_by_text(corpus)
    assert len({rows[t]["file_path"].split("/")[-1] for t in kept}) > 1
    assert {rows[t]["dump"] for t in kept} == {"CC-MAIN-2024-10"}
    other_seed = [text for _, text in split_docs(local(corpus, fraction=0.2, seed=7), tmp_path)]
    assert set(other_seed) != set(kept)
    # A larger share keeps every group of a smaller one.
    half = {text for _, text in split_docs(local(corpus, fraction=0.5), tmp_path)}
    assert set(kept) < half


def test_a_tiny_fraction_keeps_one_row_group(corpus, tmp_path, capfd):
    kept = split_docs(local(corpus, fraction=1e-9, val_tokens=1), tmp_path)
    assert len(kept) == ROWS
    err = capfd.readouterr().err
    assert err.startswith("fineweb: reading 1 of 80 row groups of dataset.train_files (1.25% of")


@pytest.fixture
def memory_hub(monkeypatch, corpus):
    """The corpus's files at the hub's paths in an in-memory fsspec file system, as the hub."""
    hub = counting(MemoryFileSystem)()
    for name in NAMES:
        hub.pipe_file(f"{HUB_ROOT}/{name}", (corpus / name).read_bytes())
    hub.pipe_file(f"{HUB_ROOT}/README.md", b"not parquet")
    monkeypatch.setattr(
        fineweb, "filesystem", lambda source: hub if source == "hub" else LocalFileSystem()
    )
    yield hub
    hub.rm("/datasets", recursive=True)


def test_the_hub_runs_the_same_code_on_its_file_system(memory_hub, corpus, tmp_path):
    hub = FineWebOptions(fraction=0.1, val_tokens=500)
    from_hub = split_docs(hub, tmp_path)
    # The hub's names are the local copy's names: the same sample.
    assert from_hub == split_docs(local(corpus, fraction=0.1), tmp_path)
    assert len(from_hub) == 0.1 * FILES * GROUPS * ROWS
    files = sum(len(memory_hub.cat_file(f"{HUB_ROOT}/{name}")) for name in NAMES)
    assert memory_hub.fetched < 0.2 * files
    assert FineWebSource(hub).variant == "hub-sample-10BT"


def test_the_hub_revision_and_subset_choose_the_folder(memory_hub, tmp_path):
    other = "0" * 40
    with pytest.raises(DataError) as refused:
        split_docs(FineWebOptions(revision=other, fraction=0.1), tmp_path)
    assert str(refused.value) == (
        f"HuggingFaceFW/fineweb-edu@0000000 sample/10BT: no parquet files at revision {other}; "
        "check dataset.subset and dataset.revision"
    )
    with pytest.raises(DataError, match=r"@87f0914 sample/100BT: no parquet files"):
        split_docs(FineWebOptions(subset="sample-100BT", fraction=0.1), tmp_path)


def test_a_hub_failure_mid_way_is_one_line(memory_hub, tmp_path, monkeypatch):
    def broken(path, start, end):
        raise ConnectionError("Connection reset by peer\nsecond line")

    monkeypatch.setattr(memory_hub, "raw_range", broken)
    with pytest.raises(DataError) as refused:
        split_docs(FineWebOptions(fraction=0.1), tmp_path)
    assert str(refused.value) == (
        "could not read HuggingFaceFW/fineweb-edu@87f0914 sample/10BT from the Hugging Face hub "
        '(ConnectionError: Connection reset by peer); use source = "local" with downloaded files'
    )


def test_an_unreachable_hub_stops_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", NOWHERE)
    with pytest.raises(DataError) as refused:
        split_docs(FineWebOptions(fraction=0.01), tmp_path)
    assert str(refused.value) == (
        "could not read HuggingFaceFW/fineweb-edu from the Hugging Face hub "
        "(hub.nowhere.invalid cannot be resolved: Name or service not known; offline?); "
        'use source = "local" with downloaded files'
    )


def test_gpt_prepare_of_the_shipped_fineweb_experiment_offline_is_one_line(tmp_path):
    gpt = str(Path(sys.executable).with_name("gpt"))
    done = subprocess.run(
        [gpt, "prepare", str(REPO / "experiments" / "fineweb.toml"), "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "HF_ENDPOINT": NOWHERE},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "Error: could not read HuggingFaceFW/fineweb-edu from the Hugging Face hub "
        "(hub.nowhere.invalid cannot be resolved: Name or service not known; offline?); "
        'use source = "local" with downloaded files'
    ]


def test_the_fingerprint_follows_fraction_seed_and_revision(corpus):
    def print_of(**changes):
        return fingerprint("fineweb", FineWebOptions(**{"fraction": 0.01, **changes}))

    same = print_of()
    assert print_of() == same
    changed = [print_of(fraction=0.02), print_of(seed=7), print_of(revision="a" * 40)]
    assert len({same, *changed}) == 4
    # Local files: their identity is in it too, so a replaced file prepares again.
    assert fingerprint("fineweb", local(corpus, fraction=0.1)) == fingerprint(
        "fineweb", local(corpus, fraction=0.1)
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"revision": "main"}, "revision: expected a commit of HuggingFaceFW/fineweb-edu"),
        ({"subset": "sample-10bt"}, 'subset: expected "sample-10BT"'),
    ],
)
def test_a_moving_revision_or_an_unknown_subset_is_refused(changes, message):
    with pytest.raises(OptionValueError, match=message):
        FineWebOptions(**changes)


def test_min_int_score_filters_the_groups_read(corpus, tmp_path):
    everything = split_docs(local(corpus, fraction=0.25, val_tokens=1), tmp_path)
    rows = rows_by_text(corpus)
    good = split_docs(local(corpus, fraction=0.25, val_tokens=1, min_int_score=4), tmp_path)
    assert [t for _, t in good] == [t for _, t in everything if rows[t]["int_score"] >= 4]
    assert 0 < len(good) < len(everything)


def test_max_tokens_stops_reading(corpus, counted, tmp_path):
    footers = scan(corpus)[1]
    split_docs(local(corpus, fraction=0.5), tmp_path)
    whole = counted[-1].fetched - footers
    capped = split_docs(local(corpus, fraction=0.5, max_tokens=20_000), tmp_path)
    rows = rows_by_text(corpus)
    train = [t for split, t in capped if split == "train"]
    assert 19_000 < sum(rows[t]["token_count"] + 1 for t in train) <= 20_000
    # 20,000 tokens is about 250 pages, three groups of the 40 chosen: the rest is not read.
    assert counted[-1].fetched - footers < 0.15 * whole


def test_parquet_without_token_count_is_counted_with_gpt2(tmp_path):
    table = pa.table({"text": [f"page {i} about tides and moons" for i in range(40)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=4)
    kept = split_docs(local(tmp_path, fraction=0.5, val_tokens=30), tmp_path)
    assert len(kept) == 20
    encoding, seen, val = gpt2_encoding(), 0, 0
    for _, text in kept:
        if seen >= 30:
            break
        seen += len(encoding.encode_ordinary(text)) + 1
        val += 1
    assert [split for split, _ in kept] == ["val"] * val + ["train"] * (20 - val)
    assert 2 < val < 10


def test_preparing_again_gives_the_same_sample_and_a_new_seed_another(corpus, write_toml, tmp_path):
    from nanogpt_core.config.experiment_file import load_experiment
    from nanogpt_core.data.preparation import prepare_dataset
    from nanogpt_core.plugins.registry import load_plugins

    plugins = load_plugins(disabled=())
    experiment = write_toml(
        "fineweb.toml",
        f"""
        [dataset]
        plugin = "fineweb"
        source = "local"
        train_files = ["{corpus}/*.parquet"]
        fraction = 0.1
        val_tokens = 2000
        """,
    )

    def prepare(*overrides, force=False):
        config = load_experiment(experiment, overrides, plugins)
        data = prepare_dataset(config, plugins, data_dir=tmp_path / "data", force=force)
        return data.meta["fingerprint"], data.split_path("train").read_bytes()

    first = prepare()
    assert prepare() == first  # up to date: used as it is
    assert prepare(force=True) == first  # prepared again: the same bytes
    other = prepare("dataset.seed=7")
    assert other[0] != first[0] and other[1] != first[1]


def test_a_damaged_file_or_a_missing_column_is_one_line(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file \("):
        split_docs(local(tmp_path, fraction=0.5), tmp_path)
    (tmp_path / "bad.parquet").unlink()
    pq.write_table(pa.table({"body": ["a page"], "int_score": [3]}), tmp_path / "a.parquet")
    with pytest.raises(DataError) as refused:
        split_docs(local(tmp_path, fraction=0.5), tmp_path)
    assert str(refused.value) == (
        f"{tmp_path / 'a.parquet'}: has no 'text' column (it has: body, int_score); "
        "set text_field to one of them"
    )
