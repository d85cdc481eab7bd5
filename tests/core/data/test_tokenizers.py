"""Tokenizers as a plugin kind: the built-ins, a third party's, and a Korean tokenizer.json end to end."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import numpy as np
import pytest

from nanogpt_core import NanoGPTError, Tokenizer, hookimpl
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.data.preparation import prepare_dataset
from nanogpt_core.data.tokenizers import tokenizer_from_description
from nanogpt_core.errors import DataError
from nanogpt_core.plugins.registry import load_plugins

tokenizers = pytest.importorskip("tokenizers")

# Short Korean sentences, recombined into stories: a corpus GPT-2's BPE serves badly.
KOREAN = [
    "옛날 옛적에 작은 마을에 한 소녀가 살았습니다.",
    "소녀는 매일 아침 강가에 가서 물을 길었습니다.",
    "어느 날 소녀는 강가에서 반짝이는 돌을 발견했습니다.",
    "그 돌은 말을 하는 마법의 돌이었습니다.",
    "고양이가 창밖을 바라보며 하품을 했습니다.",
    "햇살이 따뜻하게 방 안을 비추었습니다.",
    "할머니는 맛있는 떡을 만들어 주셨습니다.",
    "아이들은 눈이 오자 밖으로 뛰어나가 눈사람을 만들었습니다.",
    "작은 새가 나무 위에서 노래를 불렀습니다.",
    "그날 밤 하늘에는 별이 가득했습니다.",
]


def korean_stories(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(KOREAN, 4)) for _ in range(count)]


def train_tokenizer_json(path: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer.json trained on the Korean sentences, as a user would make one."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(korean_stories(50), trainer)
    backend.save(str(path))
    return path


def prepare(experiment: Path, data_dir: Path, plugins=None):
    plugins = plugins or load_plugins(disabled=())
    config = load_experiment(experiment, (), plugins)
    return prepare_dataset(config, plugins, data_dir=data_dir)


def korean_experiment(folder: Path, extra: str = "") -> Path:
    stories = folder / "stories.txt"
    stories.write_text("\n<|endoftext|>\n".join(korean_stories(80)) + "\n", encoding="utf-8")
    train_tokenizer_json(folder / "ko.json")
    experiment = folder / "ko.toml"
    experiment.write_text(
        textwrap.dedent("""\
            name = "ko"
            [dataset]
            plugin = "tinystories"
            source = "local"
            train_files = ["stories.txt"]
            val_fraction = 0.2

            [tokenizer]
            plugin = "huggingface"
            path = "ko.json"
            """)
        + textwrap.dedent(extra),
        encoding="utf-8",
    )
    return experiment


# The registry.


@attrs.frozen(kw_only=True)
class ByteOptions:
    """Options of the test's ``bytes`` tokenizer."""

    offset: int = 0


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens, 256 ends a document: a third party's tokenizer."""

    vocab_size = 257
    eot_id = 256

    def __init__(self, options: ByteOptions) -> None:
        self.options = options

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def description(self) -> dict:
        return {"kind": "bytes", "vocab_size": 257, "eot_id": 256}

    @classmethod
    def from_description(cls, description: dict) -> ByteTokenizer:
        return cls(ByteOptions())


class BytesPlugin:
    @hookimpl
    def register_tokenizers(self, register):
        register("bytes", ByteTokenizer, options=ByteOptions)


def test_register_tokenizers_built_ins_come_from_entry_points(installed_plugins):
    registry = installed_plugins.tokenizers()
    assert {"char", "gpt2", "huggingface"} <= set(registry)
    assert registry["char"].plugin == "char" and registry["gpt2"].plugin == "gpt2"
    assert registry["huggingface"].plugin == "huggingface"


def test_register_tokenizers_a_third_party_tokenizer_prepares_and_rebuilds(tmp_path):
    plugins = load_plugins(disabled=())
    assert plugins.register(BytesPlugin(), name="bytes_plugin")
    source = tmp_path / "input.txt"
    source.write_text("héllo wörld\n" * 100)
    experiment = tmp_path / "x.toml"
    experiment.write_text(
        '[dataset]\nplugin = "shakespeare"\npath = "input.txt"\n[tokenizer]\nplugin = "bytes"\n'
    )
    prepared = prepare(experiment, tmp_path / "data", plugins)
    # Not the default char folder: a tokenizer of its own gets a folder of its own.
    assert prepared.folder.parent == tmp_path / "data" / "shakespeare"
    assert prepared.folder.name.startswith("tiny-char.bytes-")
    assert prepared.meta["tokenizer"] == {"kind": "bytes", "vocab_size": 257, "eot_id": 256}
    ids = np.fromfile(prepared.split_path("train"), dtype=prepared.dtype).tolist()
    text = source.read_text()
    assert ids[-1] == 256 and bytes(ids[:-1]).decode() == text[: int(len(text) * 0.9)]
    rebuilt = tokenizer_from_description(prepared.tokenizer, plugins)
    assert isinstance(rebuilt, ByteTokenizer)
    with pytest.raises(NanoGPTError, match="tokenizer 'bytes' is not installed"):
        tokenizer_from_description(prepared.tokenizer)  # the installed plugins lack it


def test_one_argument_rebuilding_of_the_built_ins_still_works():
    char = tokenizer_from_description(
        {"kind": "char", "name": "char", "vocab_size": 3, "eot_id": None, "chars": "abc"}
    )
    assert char.encode("cab") == [2, 0, 1] and char.decode([0, 1, 2]) == "abc"
    gpt2 = tokenizer_from_description({"kind": "gpt2", "vocab_size": 50257, "eot_id": 50256})
    assert gpt2.encode("Hello world") == [15496, 995] and gpt2.start_ids() == [50256]
    with pytest.raises(NanoGPTError, match="'chars' must hold vocab_size distinct characters"):
        tokenizer_from_description({"kind": "char", "vocab_size": 4, "chars": "abc"})


def test_a_tokenizer_name_that_is_not_registered_is_one_line(tmp_path):
    (tmp_path / "input.txt").write_text("some text\n" * 20)
    experiment = tmp_path / "x.toml"
    experiment.write_text(
        '[dataset]\nplugin = "shakespeare"\npath = "input.txt"\ntokenizer = "gtp2"\n'
    )
    with pytest.raises(DataError) as info:
        prepare(experiment, tmp_path / "data")
    assert str(info.value) == (
        "dataset.tokenizer: no tokenizer named 'gtp2' (did you mean \"gpt2\"?); "
        "installed: char, gpt2, huggingface"
    )


def test_a_tokenizer_that_needs_options_asks_for_a_table(tmp_path):
    (tmp_path / "input.txt").write_text("some text\n" * 20)
    experiment = tmp_path / "x.toml"
    experiment.write_text(
        '[dataset]\nplugin = "shakespeare"\npath = "input.txt"\ntokenizer = "huggingface"\n'
    )
    with pytest.raises(DataError, match=r"dataset.tokenizer: tokenizer 'huggingface' needs path: "):
        prepare(experiment, tmp_path / "data")


def test_a_bad_tokenizer_json_is_one_line(tmp_path):
    from nanogpt_plugins.tokenizers.huggingface import HuggingFaceOptions, HuggingFaceTokenizer

    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0"}')
    with pytest.raises(
        DataError, match=rf"tokenizer.path: {bad}: not a Hugging Face tokenizer.json"
    ):
        HuggingFaceTokenizer(HuggingFaceOptions(path=str(bad)))
    with pytest.raises(DataError, match=r"tokenizer.path: .*missing.json: file not found"):
        HuggingFaceTokenizer(HuggingFaceOptions(path=str(tmp_path / "missing.json")))
    good = train_tokenizer_json(tmp_path / "ko.json")
    with pytest.raises(DataError, match=r"tokenizer\.eos_token: '</s>' is not in"):
        HuggingFaceTokenizer(HuggingFaceOptions(path=str(good), eos_token="</s>"))


def test_without_the_tokenizers_package_one_line_names_the_extra(tmp_path, monkeypatch):
    from nanogpt_plugins.tokenizers.huggingface import HuggingFaceOptions, HuggingFaceTokenizer

    path = train_tokenizer_json(tmp_path / "ko.json")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if it were not installed
    with pytest.raises(NanoGPTError, match=r"pip install 'nanogpt\[tokenizers\]'"):
        HuggingFaceTokenizer(HuggingFaceOptions(path=str(path)))


def test_a_korean_tokenizer_json_prepares_its_own_folder_and_edits_are_seen(tmp_path):
    experiment = korean_experiment(tmp_path)
    prepared = prepare(experiment, tmp_path / "data")
    assert prepared.folder.name.startswith("local-gpt2.huggingface-")
    description = prepared.tokenizer
    assert description["kind"] == "huggingface" and description["eot_id"] == 0
    assert description["tokenizer_json"] == (tmp_path / "ko.json").read_text(encoding="utf-8")
    tokenizer = tokenizer_from_description(description)
    ids = np.fromfile(prepared.split_path("train"), dtype=prepared.dtype).tolist()
    stories = tokenizer.decode(ids).split("<|endoftext|>")
    assert stories[-1] == "" and all(s in korean_stories(80) for s in stories[:-1])
    assert prepared.meta["splits"]["train"]["documents"] == len(stories) - 1
    # Train the tokenizer.json again (a different vocabulary): the data is prepared again.
    train_tokenizer_json(tmp_path / "ko.json", vocab_size=350)
    again = prepare(experiment, tmp_path / "data")
    assert again.folder == prepared.folder
    assert again.meta["fingerprint"] != prepared.meta["fingerprint"]
    assert again.tokenizer["vocab_size"] == 350


def gpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
    )


TINY_RUN = """
[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 16

[train]
batch_size = 4
steps_per_epoch = 10
warmup_steps = 2
eval_every = 10
eval_batches = 2
log_every = 5
device = "cpu"

[[callbacks]]
plugin = "checkpoint"
"""


@pytest.mark.slow
def test_korean_end_to_end_prepare_run_sample_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    experiment = korean_experiment(tmp_path, TINY_RUN)
    folders = ["--data-dir", "data"]
    assert gpt("prepare", str(experiment), *folders, cwd=tmp_path).returncode == 0
    run = gpt("run", str(experiment), *folders, "--results-dir", "results", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    ckpt = tmp_path / "results" / "ko" / "checkpoints" / "last.pth"
    # The checkpoint carries the tokenizer: the original file is not needed any more.
    original = tmp_path / "ko.json"
    kept = original.read_text(encoding="utf-8")
    original.unlink()
    sample = gpt(
        "sample", "--ckpt", str(ckpt), "--prompt", "소녀는", "--max-new-tokens", "20", cwd=tmp_path
    )
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("소녀는")
    export = gpt("export", "--ckpt", str(ckpt), "--out", "hf", cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    assert (tmp_path / "hf" / "tokenizer.json").read_text(encoding="utf-8") == kept
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = tokenizers.Tokenizer.from_str(kept)
    for text in [
        "할머니는 맛있는 떡을 만들어 주셨습니다.",
        "작은 새가 노래를 불렀습니다!",
        KOREAN[0],
    ]:
        assert hf_tokenizer(text)["input_ids"] == ours.encode(text).ids
        assert hf_tokenizer.decode(ours.encode(text).ids) == text
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.eos_token_id == 0
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert model.config.eos_token_id == 0
    shutil.rmtree(tmp_path / "hf")
