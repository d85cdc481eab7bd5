"""Experiment files: strict structuring, plugin options, extends and --set overrides."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from nanogpt_core import hookimpl, option
from nanogpt_core.config.experiment import MAX_NAME_LENGTH
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.config.overrides import parse_value
from nanogpt_core.errors import ConfigError
from nanogpt_core.plugins.options import OptionValueError, path_fields, positive
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_plugins.optimizers import adamw
from nanogpt_plugins.schedules import standard


def _min_score(_instance, attribute, value):
    if not 0 <= value <= 5:
        raise OptionValueError(attribute.name, f"must be between 0 and 5, got {value}")


@attrs.frozen(kw_only=True)
class CorpusOptions:
    """Options of the test corpus."""

    fraction: float = option(1.0, "Share of documents.", validator=positive)
    min_int_score: int = option(0, "Lowest score.", validator=_min_score)
    files: list[str] = option(doc="Files.", factory=list)
    text: str | None = option(None, "A text file.", path=True)
    shards: list[str] = option(doc="Files or globs.", factory=list, path=True)


@attrs.frozen(kw_only=True)
class SaveOptions:
    """Options of the test checkpoint callback."""

    every_steps: int = option(100, "How often.", validator=positive)
    folder: str | None = option(None, "Where to write.", path=True)


@attrs.frozen(kw_only=True)
class VocabOptions:
    """Options of the test tokenizer."""

    vocab: str | None = option(None, "A vocabulary file.", path=True)
    lowercase: bool = option(False, "Lowercase first.")


class Corpus:
    @hookimpl
    def register_datasets(self, register):
        register("corpus", lambda o: o, options=CorpusOptions)

    @hookimpl
    def register_callbacks(self, register):
        register("save", lambda o: o, options=SaveOptions)
        register("log", lambda o: o)

    @hookimpl
    def register_tokenizers(self, register):
        register("vocab", Vocab, options=VocabOptions)


class Vocab:
    """A tokenizer that only needs to exist for config tests."""

    def __init__(self, options):
        self.options = options

    @classmethod
    def from_description(cls, description):
        return cls(VocabOptions())


@pytest.fixture
def plugins():
    plugins = load_plugins(entry_points=False, disabled=())
    plugins.register(Corpus(), name="corpus-plugin")
    # The optimizer and schedule every experiment names by default, as installed.
    plugins.register(adamw, name="adamw")
    plugins.register(standard, name="schedules")
    return plugins


FULL = """
name = "corpus_gpt_v2"
seed = 1337

[dataset]
plugin = "corpus"
fraction = 0.01

[model]
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
bias = false

[train]
batch_size = 16
gradient_accumulation_steps = 32
epochs = 100
steps_per_epoch = 200
learning_rate = 6e-4
min_lr = 6e-5
warmup_steps = 700
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
eval_every = 250
eval_batches = 50
log_every = 10
mixed_precision = "bf16"
compile = true
device = "auto"

[[callbacks]]
plugin = "save"
every_steps = 500

[[callbacks]]
plugin = "log"
"""


def problems_of(path, plugins, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_experiment(path, overrides, plugins)
    return info.value.problems


def test_full_example_structures_core_and_plugin_options(write_toml, plugins):
    config = load_experiment(write_toml("x.toml", FULL), (), plugins)
    assert config.name == "corpus_gpt_v2"
    assert config.model.n_embd == 768 and config.model.bias is False
    assert config.train.learning_rate == 6e-4 and config.train.mixed_precision == "bf16"
    assert config.dataset.plugin == "corpus"
    assert config.dataset.options == CorpusOptions(fraction=0.01)
    assert [c.plugin for c in config.callbacks] == ["save", "log"]
    assert config.callbacks[0].options == SaveOptions(every_steps=500)
    as_dict = config.to_dict()
    assert as_dict["dataset"] == {
        "plugin": "corpus",
        "fraction": 0.01,
        "min_int_score": 0,
        "files": [],
        "text": None,
        "shards": [],
    }
    assert as_dict["callbacks"][0] == {"plugin": "save", "every_steps": 500, "folder": None}
    assert "tokenizer" not in as_dict  # only when the experiment has a [tokenizer] table


def test_name_defaults_to_the_file_stem(write_toml, plugins):
    config = load_experiment(
        write_toml("my_exp.toml", '[dataset]\nplugin = "corpus"\n'), (), plugins
    )
    assert config.name == "my_exp"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("[train]\nbatch_size = 1.9", "train.batch_size: expected an integer, got 1.9"),
        ('[train]\nbatch_size = "12"', 'train.batch_size: expected an integer, got "12"'),
        ("[train]\nbatch_size = true", "train.batch_size: expected an integer, got true"),
        ('[train]\ncompile = "no"', 'train.compile: expected true or false, got "no"'),
        ('[train]\nlearning_rate = "fast"', 'train.learning_rate: expected a float, got "fast"'),
        ("[model]\nbias = 1", "model.bias: expected true or false, got 1"),
        ('seed = "1"', 'seed: expected an integer, got "1"'),
        ("[train]\nwarmup_steps = -1", "train.warmup_steps: must be 0 or more, got -1"),
        (
            '[train]\nmixed_precision = "fp8"',
            'train.mixed_precision: expected one of "auto", "no", "fp16", "bf16", got "fp8"',
        ),
        ("[model]\nn_head = 5", "model.n_embd: 768 is not divisible by n_head = 5"),
        ("[model]\nnlayer = 5", 'model.nlayer: unknown key (did you mean "n_layer"?)'),
        ("lerning_rate = 1", "lerning_rate: unknown key"),
        ('name = "a/b"', 'name: "a/b" is not usable as a folder name'),
        ('name = "abc\\n"', 'name: "abc\\n" is not usable as a folder name'),
        (f'name = "{"a" * 224}"', "name: 224 characters is too long for a folder name"),
        ("seed = -1", "seed: -1 is outside numpy's seed range; use 0 to 4294967295"),
        ("seed = 4294967296", "seed: 4294967296 is outside numpy's seed range"),
        ("[train]\nlearning_rate = nan", "train.learning_rate: expected a finite number, got nan"),
        ("[train]\nbeta2 = -inf", "train.beta2: expected a finite number, got -inf"),
        ("[train]\nmemory_check = 1", "train.memory_check: expected true or false, got 1"),
        ("train = []", "train: expected a table, got an array"),
        ("[[model]]\nn_layer = 2", "model: expected a table, got an array"),
        ("callbacks = {}", "callbacks: expected an array, got a table"),
        ("callbacks = [3]", "callbacks[0]: expected a table, got 3"),
        ("tokenizer = 3", "tokenizer: expected a table, got 3"),
    ],
)
def test_core_values_are_checked_strictly(write_toml, plugins, line, expected):
    path = write_toml(
        "x.toml",
        f'{line}\n[dataset]\nplugin = "corpus"\n'
        if line.startswith(("seed", "name", "lern", "train =", "callbacks =", "tokenizer ="))
        else f'[dataset]\nplugin = "corpus"\n{line}\n',
    )
    problems = problems_of(path, plugins)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: {expected}")


def test_an_int_is_fine_where_a_float_is_expected(write_toml, plugins):
    path = write_toml(
        "x.toml", '[dataset]\nplugin = "corpus"\nfraction = 1\n[train]\nlearning_rate = 1\n'
    )
    config = load_experiment(path, (), plugins)
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
    assert config.dataset.options.fraction == 1.0


def test_plugin_options_are_checked_with_the_same_machinery(write_toml, plugins):
    path = write_toml(
        "x.toml",
        """
        [dataset]
        plugin = "corpus"
        fraction = "all"
        min_int_score = 9
        files = "a.txt"
        [[callbacks]]
        plugin = "log"
        [[callbacks]]
        plugin = "save"
        every_step = 3
        """,
    )
    problems = problems_of(path, plugins)
    assert problems == [
        f'{path}: dataset.fraction: expected a float, got "all"',
        f'{path}: dataset.files: expected an array, got "a.txt"',
        f'{path}: callbacks[1].every_step: unknown key (did you mean "every_steps"?)',
    ]


def test_plugin_validator_message_survives(write_toml, plugins):
    path = write_toml("x.toml", '[dataset]\nplugin = "corpus"\nmin_int_score = 9\n')
    assert problems_of(path, plugins) == [
        f"{path}: dataset.min_int_score: must be between 0 and 5, got 9"
    ]


def test_missing_plugin_lists_the_installed_ones(write_toml, plugins):
    path = write_toml(
        "x.toml", '[dataset]\nplugin = "corpsu"\n[[callbacks]]\nplugin = "tensorboard"\n'
    )
    assert problems_of(path, plugins) == [
        f"{path}: dataset.plugin: no dataset plugin named 'corpsu' (did you mean \"corpus\"?); installed: corpus",
        f"{path}: callbacks[0].plugin: no callback plugin named 'tensorboard'; installed: log, save",
    ]


def test_missing_dataset_table_and_plugin_key(write_toml, plugins):
    assert problems_of(write_toml("a.toml", "seed = 1\n"), plugins) == [
        f"{write_toml('a.toml', 'seed = 1').parent / 'a.toml'}: dataset: missing required key"
    ]
    path = write_toml("b.toml", "[dataset]\nfraction = 0.5\n")
    assert problems_of(path, plugins) == [f"{path}: dataset.plugin: missing required key"]


def test_same_callback_twice_is_an_error(write_toml, plugins):
    path = write_toml(
        "x.toml",
        '[dataset]\nplugin = "corpus"\n[[callbacks]]\nplugin = "log"\n[[callbacks]]\nplugin = "log"\n',
    )
    assert problems_of(path, plugins) == [
        f"{path}: callbacks[1].plugin: 'log' is already enabled above"
    ]


def test_toml_syntax_error_gives_line_and_column(write_toml, plugins):
    path = write_toml("x.toml", '[dataset]\nplugin = "corpus"\n[train]\nbatch_size = = 3\n')
    (problem,) = problems_of(path, plugins)
    assert problem.startswith(f"{path}: invalid TOML:")
    assert "line 4, column" in problem


def test_missing_file(tmp_path, plugins):
    assert problems_of(tmp_path / "nope.toml", plugins) == [
        f"{tmp_path / 'nope.toml'}: file not found"
    ]


def test_extends_chain_deep_merges_and_this_file_wins(write_toml, plugins):
    write_toml(
        "bases/root.toml",
        """
        abstract = true
        name = "root"
        seed = 1
        [dataset]
        plugin = "corpus"
        fraction = 0.5
        min_int_score = 2
        [model]
        n_layer = 2
        [train]
        learning_rate = 1e-3
        [[callbacks]]
        plugin = "log"
        """,
    )
    write_toml(
        "bases/mid.toml", 'extends = "root.toml"\nseed = 2\n[model]\nn_head = 4\nn_embd = 64\n'
    )
    leaf = write_toml(
        "leaf.toml",
        'extends = "bases/mid.toml"\n[dataset]\nfraction = 0.25\n[[callbacks]]\nplugin = "save"\n',
    )
    config = load_experiment(leaf, (), plugins)
    assert config.name == "leaf"  # a base's name is not inherited
    assert config.abstract is False  # nor is `abstract`
    assert config.seed == 2
    assert config.dataset.options == CorpusOptions(fraction=0.25, min_int_score=2)
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd) == (2, 4, 64)
    assert config.train.learning_rate == 1e-3
    assert [c.plugin for c in config.callbacks] == ["save"]  # arrays are replaced, not appended
    assert load_experiment(leaf.parent / "bases" / "root.toml", (), plugins).abstract is True


def test_extends_cycle_is_an_error(write_toml, plugins):
    write_toml("a.toml", 'extends = "b.toml"\n')
    write_toml("b.toml", 'extends = "a.toml"\n')
    (problem,) = problems_of(write_toml("c.toml", 'extends = "a.toml"\n'), plugins)
    assert "extends: cycle c.toml -> a.toml -> b.toml -> a.toml" in problem


def test_extends_missing_file(write_toml, plugins):
    (problem,) = problems_of(write_toml("c.toml", 'extends = "gone.toml"\n'), plugins)
    assert "extends: file not found" in problem and "gone.toml" in problem


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3e-4", 3e-4),
        ("4", 4),
        ("true", True),
        ("hello", "hello"),
        ('"4"', "4"),
        ('["a", "b"]', ["a", "b"]),
    ],
)
def test_parse_value_reads_toml_literals_and_bare_words(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_set_overrides_any_key(write_toml, plugins):
    path = write_toml("x.toml", FULL)
    config = load_experiment(
        path,
        [
            "train.learning_rate=3e-4",
            "model.n_layer=4",
            "train.mixed_precision=no",
            'dataset.files=["a", "b"]',
            "callbacks.save.every_steps=7",
        ],
        plugins,
    )
    assert config.train.learning_rate == 3e-4
    assert config.model.n_layer == 4
    assert config.train.mixed_precision == "no"
    assert config.dataset.options.files == ["a", "b"]
    assert config.callbacks[0].options.every_steps == 7


def test_set_picks_array_tables_by_index(write_toml, plugins):
    path = write_toml("x.toml", FULL)
    config = load_experiment(path, ["callbacks[0].every_steps=3"], plugins)
    assert config.callbacks[0].options.every_steps == 3
    with pytest.raises(ConfigError, match="already enabled"):
        load_experiment(path, ["callbacks[1].plugin=save"], plugins)


def test_set_errors_are_checked_like_file_values(write_toml, plugins):
    path = write_toml("x.toml", FULL)
    assert problems_of(path, plugins, ["train.lr=1"]) == [
        f"{path}: train.lr: unknown key",
    ]
    assert problems_of(path, plugins, ["model.n_layer=many"]) == [
        f'{path}: model.n_layer: expected an integer, got "many"'
    ]
    assert problems_of(path, plugins, ["n_layer"]) == [
        f"{path}: --set n_layer: expected KEY=VALUE, e.g. train.learning_rate=3e-4"
    ]
    assert problems_of(path, plugins, ["callbacks.nope.x=1"]) == [
        f"{path}: --set callbacks.nope.x=1: no table with plugin = 'nope'"
    ]


def test_train_defaults_pick_precision_by_device_and_check_memory(write_toml, plugins):
    config = load_experiment(write_toml("x.toml", '[dataset]\nplugin = "corpus"\n'), (), plugins)
    assert config.train.mixed_precision == "auto"
    assert config.train.memory_check is True
    path = write_toml("y.toml", FULL)
    config = load_experiment(
        path, ["train.mixed_precision=auto", "train.memory_check=false"], plugins
    )
    assert (config.train.mixed_precision, config.train.memory_check) == ("auto", False)
    assert config.to_dict()["train"]["memory_check"] is False


def test_longest_allowed_name_leaves_room_for_the_fresh_suffix(write_toml, plugins):
    name = "a" * MAX_NAME_LENGTH
    path = write_toml("x.toml", f'name = "{name}"\n[dataset]\nplugin = "corpus"\n')
    assert load_experiment(path, (), plugins).name == name
    assert len(f"{name}.old-20250101-120000-999") < 255


def test_tokenizer_table_is_checked_against_tokenizer_plugins(write_toml, plugins):
    path = write_toml(
        "x.toml", '[dataset]\nplugin = "corpus"\n[tokenizer]\nplugin = "vocab"\nlowercase = true\n'
    )
    config = load_experiment(path, (), plugins)
    assert config.tokenizer.plugin == "vocab"
    assert config.tokenizer.options == VocabOptions(lowercase=True)
    assert config.to_dict()["tokenizer"] == {"plugin": "vocab", "vocab": None, "lowercase": True}
    assert problems_of(path, plugins, ["tokenizer.plugin=vocabb", "tokenizer.lowercase=1"]) == [
        f"{path}: tokenizer.plugin: no tokenizer plugin named 'vocabb' "
        '(did you mean "vocab"?); installed: vocab'
    ]
    assert problems_of(path, plugins, ["tokenizer.lowercase=1", "tokenizer.lower=true"]) == [
        f"{path}: tokenizer.lowercase: expected true or false, got 1",
        f'{path}: tokenizer.lower: unknown key (did you mean "lowercase"?)',
    ]


def test_option_path_is_recorded_in_the_field_metadata():
    fields = attrs.fields_dict(CorpusOptions)
    assert fields["text"].metadata["path"] is True
    assert "path" not in fields["files"].metadata
    assert path_fields(CorpusOptions) == ["text", "shards"]


def test_relative_paths_resolve_against_the_file_that_set_them(write_toml, plugins, tmp_path):
    write_toml(
        "bases/root.toml",
        """
        abstract = true
        [dataset]
        plugin = "corpus"
        text = "corpus.txt"
        shards = ["shards/*.jsonl", "/abs/one.jsonl", "~/two.jsonl"]
        files = ["not/a/path/option"]
        [model]
        init_from = "hf/gpt2"
        """,
    )
    leaf = write_toml(
        "runs/leaf.toml",
        """
        extends = "../bases/root.toml"
        [tokenizer]
        plugin = "vocab"
        vocab = "vocab.json"
        [[callbacks]]
        plugin = "save"
        folder = "out"
        """,
    )
    config = load_experiment(leaf, (), plugins)
    bases, runs = tmp_path / "bases", tmp_path / "runs"
    # Inherited values keep the folder of the base file that wrote them.
    assert config.dataset.options.text == str(bases / "corpus.txt")
    assert config.dataset.options.shards == [
        str(bases / "shards/*.jsonl"),
        "/abs/one.jsonl",
        str(Path("~/two.jsonl").expanduser()),
    ]
    assert config.dataset.options.files == ["not/a/path/option"]
    assert config.model.init_from == str(bases / "hf/gpt2")
    assert config.tokenizer.options.vocab == str(runs / "vocab.json")
    assert config.callbacks[0].options.folder == str(runs / "out")


def test_overridden_paths_resolve_where_the_override_was_written(
    write_toml, plugins, tmp_path, monkeypatch
):
    write_toml("bases/root.toml", '[dataset]\nplugin = "corpus"\ntext = "a.txt"\n')
    leaf = write_toml(
        "runs/leaf.toml",
        'extends = "../bases/root.toml"\n[dataset]\ntext = "b.txt"\n'
        '[[callbacks]]\nplugin = "save"\n',
    )
    assert load_experiment(leaf, (), plugins).dataset.options.text == str(tmp_path / "runs/b.txt")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_experiment(
        leaf,
        ['dataset.shards=["s/*.txt"]', "callbacks.save.folder=out", "model.init_from=~/hf"],
        plugins,
    )
    assert config.dataset.options.text == str(tmp_path / "runs/b.txt")
    assert config.dataset.options.shards == [str(elsewhere / "s/*.txt")]
    assert config.callbacks[0].options.folder == str(elsewhere / "out")
    assert config.model.init_from == str(Path("~/hf").expanduser())
    # A whole table given on the command line resolves against the current folder too.
    config = load_experiment(leaf, ['dataset={plugin = "corpus", text = "c.txt"}'], plugins)
    assert config.dataset.options.text == str(elsewhere / "c.txt")


def test_paths_of_the_wrong_type_are_left_for_the_type_check(write_toml, plugins):
    path = write_toml("x.toml", '[dataset]\nplugin = "corpus"\ntext = 3\nshards = ["a", 4]\n')
    assert problems_of(path, plugins) == [
        f"{path}: dataset.text: expected a string, got 3",
        f"{path}: dataset.shards[1]: expected a string, got 4",
    ]
