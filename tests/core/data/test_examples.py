"""Example datasets in the core: cutting to the block size, templates as plugins, the checked layout."""

from __future__ import annotations

import json

import attrs
import numpy as np
import pytest

from nanogpt_core import DataError, hookimpl, option
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.data.example_preparation import cut_to_block
from nanogpt_core.data.preparation import prepare_dataset
from nanogpt_core.data.prepared import open_prepared
from nanogpt_core.plugins.registry import load_plugins

RECORDS = [
    {"instruction": f"Count to {n}.", "input": "slowly" if n % 2 else "", "output": f"{n} done."}
    for n in range(1, 41)
]


@attrs.frozen(kw_only=True)
class ShoutOptions:
    """Options of the third-party ``shout`` template."""

    marker: str = option(">>", "What starts each prompt.")


class ShoutTemplate:
    """A third party's template: the instruction in capitals after a marker."""

    def __init__(self, options: ShoutOptions) -> None:
        self.marker = options.marker

    def prompt(self, instruction: str, input: str = "") -> str:
        return f"{self.marker} {instruction.upper()} {input}\n"

    def description(self) -> dict:
        return {"kind": "shout", "marker": self.marker}

    def chat_template(self) -> str:
        return "{{ messages[0]['content'] | upper }}"

    @classmethod
    def from_description(cls, description: dict) -> ShoutTemplate:
        return cls(ShoutOptions(marker=description["marker"]))


@attrs.frozen(kw_only=True)
class CountingOptions:
    """Options of the in-process ``counting`` example dataset."""

    tokenizer: str = option("gpt2", "The tokenizer.")


class CountingExamples:
    """A third party's example source: every fifth record is validation."""

    variant = "v1"
    description = "counting examples"
    template = "alpaca"

    def __init__(self, options: CountingOptions) -> None:
        self.tokenizer = options.tokenizer

    def examples(self, split, downloads):
        return (r for i, r in enumerate(RECORDS) if (i % 5 == 0) == (split == "val"))


class ThirdParty:
    @hookimpl
    def register_templates(self, register):
        register("shout", ShoutTemplate, options=ShoutOptions)

    @hookimpl
    def register_datasets(self, register):
        register("counting", CountingExamples, options=CountingOptions)


@pytest.fixture
def plugins():
    loaded = load_plugins(disabled=())
    assert loaded.register(ThirdParty(), name="third_party")
    return loaded


def prepare(tmp_path, plugins, text):
    path = tmp_path / "x.toml"
    path.write_text(text)
    return prepare_dataset(load_experiment(path, (), plugins), plugins, data_dir=tmp_path / "data")


def texts(prepared, split):
    from nanogpt_plugins.tokenizers.gpt2 import GPT2Tokenizer

    tokens = np.fromfile(prepared.split_path(split), dtype=prepared.dtype).tolist()
    decode = GPT2Tokenizer().decode
    return [
        (decode(tokens[s : s + r]), decode(tokens[s + r : s + n]))
        for s, n, r in prepared.examples(split).tolist()
    ]


def test_fit_cuts_the_prompt_from_the_front_and_drops_what_cannot_fit():
    prompt, response = [1, 2, 3, 4], [7, 8, 0]
    assert cut_to_block(prompt, response, 6) == ([1, 2, 3, 4, 7, 8, 0], 4)  # 7 = block_size + 1
    assert cut_to_block(prompt, response, 5) == ([2, 3, 4, 7, 8, 0], 3)
    assert cut_to_block(prompt, response, 3) == ([4, 7, 8, 0], 1)  # one prompt token is enough
    assert cut_to_block(prompt, response, 2) is None  # the response alone fills the window


def test_an_example_source_prepares_with_its_default_template(tmp_path, plugins):
    prepared = prepare(tmp_path, plugins, '[dataset]\nplugin = "counting"\n')
    from nanogpt_plugins.templates.alpaca import AlpacaTemplate

    val = [r for i, r in enumerate(RECORDS) if i % 5 == 0]
    template = AlpacaTemplate()
    assert texts(prepared, "val") == [
        (template.prompt(r["instruction"], r["input"]), r["output"] + "<|endoftext|>") for r in val
    ]
    assert prepared.kind == "examples" and prepared.template == {"kind": "alpaca"}
    assert prepared.meta["block_size"] == 1024  # the model's default


def test_register_templates_a_third_party_template_is_used_by_a_template_table(tmp_path, plugins):
    default = prepare(tmp_path, plugins, '[dataset]\nplugin = "counting"\n')
    prepared = prepare(
        tmp_path,
        plugins,
        '[dataset]\nplugin = "counting"\n[template]\nplugin = "shout"\nmarker = "!!"\n',
    )
    # A template of its own gets a folder of its own; the default preparation stays.
    assert prepared.folder.name.startswith("v1.shout-") and open_prepared(default.folder)
    assert prepared.template == {"kind": "shout", "marker": "!!"}
    assert prepared.meta["template_options"] == {"name": "shout", "marker": "!!"}
    assert texts(prepared, "train")[0] == ("!! COUNT TO 2. \n", "2 done.<|endoftext|>")
    assert texts(prepared, "train")[1] == ("!! COUNT TO 3. slowly\n", "3 done.<|endoftext|>")


def test_the_template_table_overrides_the_alpaca_dataset_too(shared_data, tmp_path, plugins):
    sample = shared_data / "alpaca" / "alpaca_sample.jsonl"
    prepared = prepare(
        tmp_path,
        plugins,
        f'[dataset]\nplugin = "alpaca"\nsource = "local"\ntrain_files = ["{sample}"]\n'
        '[template]\nplugin = "shout"\n',
    )
    first = json.loads(sample.read_text().splitlines()[0])
    prompts = [p for p, _ in texts(prepared, "train") + texts(prepared, "val")]
    assert f">> {first['instruction'].upper()} \n" in prompts


def test_an_unknown_template_is_one_line(tmp_path, plugins):
    path = tmp_path / "x.toml"
    path.write_text('[dataset]\nplugin = "counting"\n[template]\nplugin = "shuot"\n')
    from nanogpt_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"template.plugin: no template plugin named 'shuot'"):
        load_experiment(path, (), plugins)


def test_block_size_and_template_are_in_the_fingerprint(tmp_path, plugins):
    small = prepare(tmp_path, plugins, '[dataset]\nplugin = "counting"\n[model]\nblock_size = 32\n')
    again = prepare(tmp_path, plugins, '[dataset]\nplugin = "counting"\n[model]\nblock_size = 32\n')
    assert again.meta["fingerprint"] == small.meta["fingerprint"]
    large = prepare(tmp_path, plugins, '[dataset]\nplugin = "counting"\n[model]\nblock_size = 64\n')
    assert large.folder == small.folder and large.meta["fingerprint"] != small.meta["fingerprint"]
    assert small.meta["splits"]["train"]["truncated"] == 32  # every prompt is over 32 tokens
    assert large.meta["splits"]["train"]["truncated"] == 0


def test_every_example_dropped_says_to_raise_block_size(tmp_path, plugins, capsys):
    with pytest.raises(
        DataError, match=r"all 32 train examples were dropped: .* model.block_size = 2; raise it"
    ):
        prepare(tmp_path, plugins, '[dataset]\nplugin = "counting"\n[model]\nblock_size = 2\n')
    assert not (tmp_path / "data" / "counting" / "v1" / "meta.json").exists()
    assert not list((tmp_path / "data" / "counting" / "v1").iterdir())  # no temporaries left


def test_a_tokenizer_without_end_of_text_is_one_line(tmp_path, plugins):
    with pytest.raises(
        DataError, match=r"^tokenizer 'char' has no end-of-text token, and examples"
    ):
        prepare(tmp_path, plugins, '[dataset]\nplugin = "counting"\ntokenizer = "char"\n')


def test_a_bad_record_from_a_source_is_one_line(tmp_path, plugins, monkeypatch):
    bad = [*RECORDS[:3], {"instruction": "x", "input": "", "output": ""}]
    monkeypatch.setattr(CountingExamples, "examples", lambda self, split, d: iter(bad))
    with pytest.raises(
        DataError,
        match=r"dataset 'counting' \(plugin 'third_party'\): train "
        r"example 4: 'output' is empty",
    ):
        prepare(tmp_path, plugins, '[dataset]\nplugin = "counting"\n')


def test_damaged_example_files_are_refused(tmp_path, plugins):
    prepared = prepare(tmp_path, plugins, '[dataset]\nplugin = "counting"\n')
    rows = prepared.folder / "val.examples.npy"
    np.save(rows, np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(DataError, match=r"splits.val.examples: expected 8 int64 rows of 3"):
        open_prepared(prepared.folder)
    bad = np.asarray(prepared.examples("train")).copy()
    np.save(rows, bad[:8] + np.array([0, 0, 10_000]))
    with pytest.raises(DataError, match=r"has rows outside val.bin's tokens"):
        open_prepared(prepared.folder)
    rows.unlink()
    with pytest.raises(DataError, match=r"says 8 examples but .*val.examples.npy is missing"):
        open_prepared(prepared.folder)
    meta = json.loads((prepared.folder / "meta.json").read_text())
    (prepared.folder / "meta.json").write_text(json.dumps({**meta, "kind": "chat"}))
    with pytest.raises(DataError, match=r"kind: expected \"tokens\" or \"examples\", got 'chat'"):
        open_prepared(prepared.folder)


def test_token_datasets_are_kind_tokens(tmp_path):
    (tmp_path / "input.txt").write_text("hello world\n" * 50)
    plugins = load_plugins(disabled=())
    prepared = prepare(tmp_path, plugins, '[dataset]\nplugin = "shakespeare"\npath = "input.txt"\n')
    assert prepared.kind == "tokens" and prepared.template is None
    with pytest.raises(DataError, match="holds tokens, not examples"):
        prepared.examples("train")


def test_a_template_table_on_a_token_dataset_is_refused(tmp_path):
    (tmp_path / "input.txt").write_text("hello world\n" * 50)
    plugins = load_plugins(disabled=())
    text = '[dataset]\nplugin = "shakespeare"\npath = "input.txt"\n[template]\nplugin = "alpaca"\n'
    with pytest.raises(
        DataError, match=r"^template.plugin: dataset 'shakespeare' yields documents"
    ):
        prepare(tmp_path, plugins, text)
