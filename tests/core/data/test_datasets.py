"""Preparing data: round trips, meta.json, fingerprints, interruption safety, refusals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.data.plugins import check_source
from nanogpt_core.data.preparation import prepare_dataset
from nanogpt_core.data.prepared import open_prepared, token_dtype
from nanogpt_core.data.tokenizers import UnknownCharacterError, gpt2_encoding
from nanogpt_core.errors import DataError, PluginError
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_plugins.tokenizers.char import CharTokenizer
from nanogpt_plugins.tokenizers.gpt2 import GPT2Tokenizer


def prepare(write_toml, data_dir, body, overrides=(), force=False):
    plugins = load_plugins(disabled=())
    config = load_experiment(write_toml("x.toml", body), overrides, plugins)
    return prepare_dataset(config, plugins, data_dir=data_dir, force=force)


def tiny(shared_data, tokenizer="char"):
    path = shared_data / "tinyshakespeare" / "input.txt"
    return f'[dataset]\nplugin = "shakespeare"\npath = "{path}"\ntokenizer = "{tokenizer}"\n'


def read_split(prepared, split):
    return np.fromfile(prepared.split_path(split), dtype=prepared.dtype)


def test_tiny_shakespeare_char_matches_nanogpt(write_toml, shared_data, tmp_path):
    prepared = prepare(write_toml, tmp_path / "data", tiny(shared_data))
    assert prepared.folder == tmp_path / "data" / "shakespeare" / "tiny-char"
    meta = prepared.meta
    assert meta["tokenizer"]["kind"] == "char" and meta["tokenizer"]["vocab_size"] == 65
    assert meta["dtype"] == "uint16"
    assert meta["splits"]["train"]["tokens"] == 1_003_854
    assert meta["splits"]["val"]["tokens"] == 111_540
    assert meta["description"] and len(meta["fingerprint"]) == 16
    tokenizer = CharTokenizer.from_description(meta["tokenizer"])
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    decoded = tokenizer.decode(read_split(prepared, "train").tolist()) + tokenizer.decode(
        read_split(prepared, "val").tolist()
    )
    assert decoded == text


def test_tiny_shakespeare_gpt2_round_trip(write_toml, shared_data, tmp_path):
    prepared = prepare(write_toml, tmp_path / "data", tiny(shared_data, "gpt2"))
    assert prepared.folder.name == "tiny-gpt2"
    assert prepared.meta["tokenizer"] == {
        "kind": "gpt2",
        "name": "gpt2",
        "vocab_size": 50257,
        "eot_id": 50256,
    }
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    cut = int(len(text) * 0.9)
    tokenizer = GPT2Tokenizer()
    train = read_split(prepared, "train").tolist()
    assert train[-1] == 50256 and train.count(50256) == 1
    assert tokenizer.decode(train[:-1]) == text[:cut]
    assert tokenizer.decode(read_split(prepared, "val").tolist()[:-1]) == text[cut:]


def test_prepare_is_skipped_when_up_to_date_and_redone_when_options_change(
    write_toml, shared_data, tmp_path
):
    data = tmp_path / "data"
    first = prepare(write_toml, data, tiny(shared_data))
    stamp = first.split_path("train").stat().st_mtime_ns
    time.sleep(0.01)
    again = prepare(write_toml, data, tiny(shared_data))
    assert again.split_path("train").stat().st_mtime_ns == stamp
    forced = prepare(write_toml, data, tiny(shared_data), force=True)
    assert forced.split_path("train").stat().st_mtime_ns != stamp
    # Same folder, different options (another copy of the file): a new fingerprint.
    copy = tmp_path / "copy.txt"
    copy.write_text((shared_data / "tinyshakespeare" / "input.txt").read_text()[:50_000])
    changed = prepare(write_toml, data, f'[dataset]\nplugin = "shakespeare"\npath = "{copy}"\n')
    assert changed.folder == first.folder
    assert changed.meta["fingerprint"] != first.meta["fingerprint"]
    assert changed.meta["splits"]["train"]["tokens"] == 45_000


def test_an_unfinished_folder_is_prepared_again(write_toml, shared_data, tmp_path):
    prepared = prepare(write_toml, tmp_path / "data", tiny(shared_data))
    (prepared.folder / "meta.json").write_text('{"splits": {"train"')  # torn: never finished
    assert open_prepared(prepared.folder) is None
    (prepared.folder / "meta.json").unlink()
    assert open_prepared(prepared.folder) is None
    again = prepare(write_toml, tmp_path / "data", tiny(shared_data))
    assert again.meta["splits"]["val"]["tokens"] == 111_540
    assert again.tokens("val") == 111_540 and again.tokens("train") == 1_003_854


def test_gpt2_batches_equal_per_document_encoding():
    encoding = gpt2_encoding()
    docs = [
        "Hello world",
        " leading space",
        "trailing ",
        "\n\nnew lines\n",
        "literal <|endoftext|> inside",
        "x",
    ]
    expected = [t for d in docs for t in (*encoding.encode_ordinary(d), 50256)]
    tokenizer = GPT2Tokenizer()
    assert tokenizer.encode_documents(docs).tolist() == expected
    assert (
        tokenizer.encode_documents(docs[:4]).tolist()
        == expected[: len(expected) - sum(len(encoding.encode_ordinary(d)) + 1 for d in docs[4:])]
    )


def test_token_dtype_and_char_errors():
    assert token_dtype(65) == "uint16" and token_dtype(50257) == "uint16"
    assert token_dtype(65_537) == "uint32"
    with pytest.raises(
        UnknownCharacterError, match="character '~' is not in this model's 3-character vocabulary"
    ):
        CharTokenizer(chars="abc").encode("ab~")


def test_gpt2_tokenizer_is_built_offline_from_hash_checked_files():
    encoding = gpt2_encoding()
    assert encoding.n_vocab == 50257
    assert encoding.encode_ordinary("Hello world") == [15496, 995]


def big_tinystories(tmp_path: Path, shared_data: Path, copies: int) -> str:
    path = shared_data / "tinystories" / "derived_tiny-stories_endoftext.txt"
    files = ", ".join(f'"{path}"' for _ in range(copies))
    return f'[dataset]\nplugin = "tinystories"\nsource = "local"\ntrain_files = [{files}]\nval_fraction = 0.02\n'


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_data_and_a_rerun_is_identical(
    write_toml, shared_data, tmp_path
):
    experiment = write_toml("big.toml", big_tinystories(tmp_path, shared_data, 40))
    gpt = str(Path(sys.executable).with_name("gpt"))
    reference = subprocess.run(
        [gpt, "prepare", str(experiment), "--data-dir", "ref"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert reference.returncode == 0, reference.stderr
    folder = tmp_path / "killed" / "tinystories" / "local-gpt2"
    proc = subprocess.Popen(
        [gpt, "prepare", str(experiment), "--data-dir", "killed"],
        cwd=tmp_path,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60

    def written() -> int:
        total = 0
        for part in folder.glob(".train.bin.tmp-*"):
            with contextlib.suppress(FileNotFoundError):  # renamed meanwhile
                total += part.stat().st_size
        return total

    while written() < 1_000_000:
        assert proc.poll() is None and time.monotonic() < deadline, (
            "prepare ended before it could be killed"
        )
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the prepare and its encoding workers
    proc.wait()
    assert open_prepared(folder) is None
    assert not (folder / "meta.json").exists() and not (folder / "train.bin").exists()
    rerun = subprocess.run(
        [gpt, "prepare", str(experiment), "--data-dir", "killed"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (folder / name).read_bytes() == (
            tmp_path / "ref" / "tinystories" / "local-gpt2" / name
        ).read_bytes(), name
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '[dataset]\nplugin = "shakespeare"\npath = "{missing}"\n',
            "dataset.path: {missing}: file not found",
        ),
        (
            '[dataset]\nplugin = "shakespeare"\npath = "{empty}"\n',
            "dataset.path: {empty}: the file is empty",
        ),
        (
            '[dataset]\nplugin = "shakespeare"\npath = "{binary}"\n',
            "dataset.path: {binary}: not UTF-8 text",
        ),
        (
            '[dataset]\nplugin = "tinystories"\nsource = "local"\ntrain_files = ["{rows}"]\n',
            "{rows}: line 1 has no 'text' field (it has: story); set text_field to one of them",
        ),
        (
            '[dataset]\nplugin = "tinystories"\nsource = "local"\ntrain_files = ["{tmp}/*.nothing"]\n',
            "dataset.train_files: {tmp}/*.nothing: no such file",
        ),
        (
            '[dataset]\nplugin = "tinystories"\nsource = "local"\ntrain_files = ["{blank}"]\n',
            "the train split is empty",
        ),
    ],
)
def test_bad_sources_are_one_clear_line(write_toml, tmp_path, body, message):
    files = {
        "missing": tmp_path / "missing.txt",
        "empty": tmp_path / "empty.txt",
        "binary": tmp_path / "binary.txt",
        "rows": tmp_path / "rows.jsonl",
        "blank": tmp_path / "blank.txt",
        "tmp": tmp_path,
    }
    files["empty"].write_text("  \n")
    files["binary"].write_bytes(b"caf\xe9 ol\xe9")
    files["rows"].write_text('{"story": "once"}\n')
    files["blank"].write_text("\n<|endoftext|>\n\n")
    with pytest.raises(DataError) as info:
        prepare(write_toml, tmp_path / "data", body.format(**files))
    assert message.format(**files) in str(info.value) and "\n" not in str(info.value)
    assert not list((tmp_path / "data").rglob("*.bin"))


def test_a_validation_split_shorter_than_one_block_is_refused(write_toml, tmp_path):
    from nanogpt_core.errors import NanoGPTError
    from nanogpt_core.train.run import run_experiment

    text = tmp_path / "small.txt"
    text.write_text("abcdefghij" * 100)  # val: 100 characters
    path = write_toml(
        "x.toml",
        f'[dataset]\nplugin = "shakespeare"\npath = "{text}"\n[model]\nn_layer = 1\nn_head = 1\nn_embd = 8\nblock_size = 128\n',
    )
    plugins = load_plugins(disabled=())
    config = load_experiment(path, (), plugins)
    with pytest.raises(NanoGPTError, match=r"val.* 100 tokens.* one window of block_size \+ 1"):
        run_experiment(
            config, plugins, results_dir=tmp_path / "r", data_dir=tmp_path / "d", progress=False
        )
    assert (
        json.loads((tmp_path / "d" / "shakespeare" / "tiny-char" / "meta.json").read_text())[
            "splits"
        ]["val"]["tokens"]
        == 100
    )


def test_gpt2_files_that_fail_the_hash_check_are_refused(monkeypatch):
    from nanogpt_core.data import tokenizers
    from nanogpt_core.errors import NanoGPTError

    monkeypatch.setattr(tokenizers, "GPT2_VOCAB_BPE_SHA256", "0" * 64)
    gpt2_encoding.cache_clear()
    try:
        with pytest.raises(NanoGPTError, match="failed their hash check"):
            gpt2_encoding()
    finally:
        gpt2_encoding.cache_clear()


def test_a_source_defines_documents_or_split_documents_or_both():
    """One rule (DatasetSource, docs/plugins.md): either way of yielding documents is enough."""

    class Base:
        variant, tokenizer, description = "v", "char", "a source"

    class SplitOnly(Base):
        def split_documents(self, downloads):
            yield "train", "text"

    class DocumentsOnly(Base):
        def documents(self, split, downloads):
            yield "text"

    check_source(SplitOnly(), "dataset plugin 'x'")
    check_source(DocumentsOnly(), "dataset plugin 'x'")
    with pytest.raises(PluginError) as refused:
        check_source(Base(), "dataset plugin 'x'")
    assert str(refused.value) == (
        "dataset plugin 'x': its factory returned Base, which lacks documents or "
        "split_documents (a method); see nanogpt_core.DatasetSource"
    )
