"""Eval tasks as a plugin kind: the built-ins, a third party's task, and faulty tasks."""

from __future__ import annotations

import attrs
import pytest
import torch

from nanogpt_core import EvalResult, EvalSuite, Evaluator, eval_metrics, hookimpl, option
from nanogpt_core.errors import ConfigError, PluginError, PluginFault
from nanogpt_core.model.gpt import GPT, GPTConfig
from nanogpt_core.plugins.registry import load_plugins


class Letters:
    """A tokenizer of the letters a-z (ids 0-25)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") for c in text]

    def start_ids(self) -> list[int]:
        return [0]


@attrs.frozen(kw_only=True)
class LastWordOptions:
    passages: list[str] = option(doc="Texts whose last letter is predicted.", factory=list)


class LastWord:
    """A LAMBADA-like task: is the last letter of each passage the model's greedy pick?"""

    def __init__(self, options: LastWordOptions) -> None:
        self.options = options

    def evaluate(self, evaluator: Evaluator) -> EvalResult:
        encode = evaluator.tokenizer.encode
        passages = self.options.passages[: evaluator.limit]
        scores = evaluator.loglikelihood([[(encode(p[:-1]), encode(p[-1]))] for p in passages])
        hits = sum(s[0].greedy for s in scores)
        return EvalResult({"acc": hits / len(passages)}, n=len(passages), notes=("letters",))


class LastWordPlugin:
    @hookimpl
    def register_eval_tasks(self, register):
        register("last_word", LastWord, options=LastWordOptions)


def tiny_evaluator(limit: int | None = None) -> Evaluator:
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=26, n_layer=1, n_head=1, n_embd=8, bias=True))
    return Evaluator(
        model=model, tokenizer=Letters(), accelerator=Accelerator(cpu=True), limit=limit
    )


def test_register_eval_tasks_built_ins_come_from_entry_points(installed_plugins):
    registry = installed_plugins.eval_tasks()
    assert {"hellaswag", "val_loss"} <= set(registry)
    assert registry["hellaswag"].plugin == "hellaswag"
    assert registry["val_loss"].plugin == "val_loss"


def test_register_eval_tasks_a_third_party_task_runs_by_name():
    plugins = load_plugins(disabled=())
    assert plugins.register(LastWordPlugin(), name="last_word_plugin")
    evaluator = tiny_evaluator(limit=2)
    passages = ["abcab", "xyzxy", "hello"]
    suite = EvalSuite.build(["last_word"], {"last_word": {"passages": passages}}, plugins)
    (report,) = suite.run(evaluator)
    # The model's own greedy picks decide the score: compute them directly.
    expected = 0
    for text in passages[:2]:
        ids = torch.tensor([Letters().encode(text[:-1])])
        with torch.no_grad():
            logits, _ = evaluator.model(ids)
        expected += int(logits[0, -1].argmax()) == Letters().encode(text[-1])[0]
    assert report.task == "last_word" and report.n == 2 and report.notes == ("letters",)
    assert report.metrics == {"acc": expected / 2}
    assert eval_metrics([report]) == {"eval/last_word/acc": expected / 2}
    with pytest.raises(ConfigError, match=r"eval\.last_word\.pasages: unknown key"):
        EvalSuite.build(["last_word"], {"last_word": {"pasages": []}}, plugins)


class Broken:
    def __init__(self, options) -> None:
        self.options = options


class Raises(Broken):
    def evaluate(self, evaluator):
        raise ZeroDivisionError("oops")


class WrongType(Broken):
    def evaluate(self, evaluator):
        return {"acc": 1.0}


class BadName(Broken):
    def evaluate(self, evaluator):
        return EvalResult({"a/b": 1.0}, n=1)


class NotFinite(Broken):
    def evaluate(self, evaluator):
        return EvalResult({"acc": float("nan")}, n=1)


class FaultyPlugin:
    @hookimpl
    def register_eval_tasks(self, register):
        register("no_evaluate", Broken)
        register("raises", Raises)
        register("wrong_type", WrongType)
        register("bad_name", BadName)
        register("not_finite", NotFinite)


def test_register_eval_tasks_faults_are_one_line_naming_the_task():
    plugins = load_plugins(disabled=())
    assert plugins.register(FaultyPlugin(), name="faulty")
    with pytest.raises(PluginError, match=r"'no_evaluate'.*has no evaluate"):
        EvalSuite.build(["no_evaluate"], plugins=plugins)
    for name, error, message in (
        ("raises", PluginFault, "eval task 'raises' failed in evaluate: ZeroDivisionError: oops"),
        ("wrong_type", PluginFault, "returned dict, expected nanogpt_core.EvalResult"),
        ("bad_name", PluginFault, "metric name 'a/b'"),
        ("not_finite", PluginFault, "metric 'acc' is nan"),
    ):
        suite = EvalSuite.build([name], plugins=plugins)
        with pytest.raises(error, match=message) as info:
            suite.run(tiny_evaluator())
        assert info.value.exit_code == 1 and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="no eval task named 'raise' \\(did you mean \"raises\""):
        EvalSuite.check_names(["raise"], "tasks", plugins)


class NamedNotes(LastWord):
    """Words its notes as its errors are worded: ``last_word: ...``."""

    def evaluate(self, evaluator: Evaluator) -> EvalResult:
        result = super().evaluate(evaluator)
        notes = ("last_word: 1 passage was cut", "the rest fit", "last_words: not its name")
        return attrs.evolve(result, notes=notes)


def test_a_note_that_names_its_task_is_shown_with_the_name_once():
    class Plugin:
        @hookimpl
        def register_eval_tasks(self, register):
            register("last_word", NamedNotes, options=LastWordOptions)

    plugins = load_plugins(disabled=())
    assert plugins.register(Plugin(), name="named_notes")
    suite = EvalSuite.build(["last_word"], {"last_word": {"passages": ["abcab"]}}, plugins)
    (report,) = suite.run(tiny_evaluator())
    # `gpt eval` prints `note: last_word: <note>`: the task's own prefix goes.
    assert report.notes == ("1 passage was cut", "the rest fit", "last_words: not its name")
