"""Experiment files: strict structuring, plugin options, extends and --set overrides."""

from __future__ import annotations

import attrs
import pytest

from nanogpt_core import hookimpl, option
from nanogpt_core.config import load_experiment, parse_value
from nanogpt_core.errors import ConfigError
from nanogpt_core.options import OptionValueError, positive
from nanogpt_core.plugins import load_plugins


def _min_score(_instance, attribute, value):
    if not 0 <= value <= 5:
        raise OptionValueError(attribute.name, f"must be between 0 and 5, got {value}")


@attrs.frozen(kw_only=True)
class CorpusOptions:
    """Options of the test corpus."""

    fraction: float = option(1.0, "Share of documents.", validator=positive)
    min_int_score: int = option(0, "Lowest score.", validator=_min_score)
    files: list[str] = option(doc="Files.", factory=list)


@attrs.frozen(kw_only=True)
class SaveOptions:
    """Options of the test checkpoint callback."""

    every_steps: int = option(100, "How often.", validator=positive)


class Corpus:
    @hookimpl
    def register_datasets(self, register):
        register("corpus", lambda o: o, options=CorpusOptions)

    @hookimpl
    def register_callbacks(self, register):
        register("save", lambda o: o, options=SaveOptions)
        register("log", lambda o: o)


@pytest.fixture
def plugins():
    plugins = load_plugins(entry_points=False, disabled=())
    plugins.register(Corpus(), name="corpus-plugin")
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
    }
    assert as_dict["callbacks"][0] == {"plugin": "save", "every_steps": 500}


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
            'train.mixed_precision: expected one of "no", "fp16", "bf16", got "fp8"',
        ),
        ("[model]\nn_head = 5", "model.n_embd: 768 is not divisible by n_head = 5"),
        ("[model]\nnlayer = 5", 'model.nlayer: unknown key (did you mean "n_layer"?)'),
        ("lerning_rate = 1", "lerning_rate: unknown key"),
        ('name = "a/b"', "name: 'a/b' is not usable as a folder name"),
    ],
)
def test_core_values_are_checked_strictly(write_toml, plugins, line, expected):
    path = write_toml(
        "x.toml",
        f'{line}\n[dataset]\nplugin = "corpus"\n'
        if line.startswith(("seed", "name", "lern"))
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
