"""nanogpt: pre-train GPT models from experiment files, extended by plugins.

This module is the whole public surface a plugin needs: ``hookimpl`` to mark its
hook functions, ``option`` and the validators to declare its options, the
``Callback`` base class and the state objects callbacks are handed, the
experiment (``ExperimentConfig``, and ``TrainConfig`` an optimizer's ``build``
is handed), the ``Evaluator`` eval tasks are handed, the ``Request`` they ask it
to score and what it returns, the errors to raise (``OptionValueError`` from an
option's validator, ``EvalInputError`` from the evaluator),
the helpers dataset plugins use to read files and write them safely, and
``tokens_from_text_bytes`` for their token estimates; ``API_VERSION`` is the
version of this surface (docs/plugins.md, "API version").
Plugins import from here only; everything else is the core's own business and
may change. Importing this package never imports torch.
"""

from nanogpt_core.config.experiment import ExperimentConfig, TrainConfig
from nanogpt_core.data.documents import (
    expand_files,
    hub_rows,
    hub_unreachable,
    quiet_hub_retries,
    read_rows,
    read_texts,
)
from nanogpt_core.data.plugins import DatasetSource
from nanogpt_core.data.prepared import PreparedData
from nanogpt_core.data.templates import Template, template_from_description
from nanogpt_core.data.token_estimates import tokens_from_text_bytes
from nanogpt_core.data.tokenizers import (
    GPT2_EOT,
    GPT2_VOCAB_SIZE,
    Tokenizer,
    UnknownCharacterError,
    gpt2_encoding,
    gpt2_files,
    tokenizer_from_description,
)
from nanogpt_core.errors import (
    ConfigError,
    DataError,
    NanoGPTError,
    PluginError,
    PluginFault,
    StorageError,
)
from nanogpt_core.eval.evaluator import (
    Continuation,
    EvalInputError,
    EvalResult,
    Evaluator,
    Request,
    SplitLoss,
)
from nanogpt_core.eval.suite import EvalSuite, TaskReport, eval_metrics
from nanogpt_core.files import atomic_write, atomic_write_text
from nanogpt_core.plugins.hookspecs import API_VERSION, hookimpl
from nanogpt_core.plugins.options import (
    OptionValueError,
    fraction,
    non_negative,
    one_of,
    option,
    positive,
)
from nanogpt_core.train.callbacks import Callback, RunPaths, TrainerState
from nanogpt_core.train.metrics import metric_scalars

__version__ = "0.4.1"

__all__ = [
    "API_VERSION",
    "GPT2_EOT",
    "GPT2_VOCAB_SIZE",
    "Callback",
    "ConfigError",
    "Continuation",
    "DataError",
    "DatasetSource",
    "EvalInputError",
    "EvalResult",
    "EvalSuite",
    "Evaluator",
    "ExperimentConfig",
    "NanoGPTError",
    "OptionValueError",
    "PluginError",
    "PluginFault",
    "PreparedData",
    "Request",
    "RunPaths",
    "SplitLoss",
    "StorageError",
    "TaskReport",
    "Template",
    "Tokenizer",
    "TrainConfig",
    "TrainerState",
    "UnknownCharacterError",
    "__version__",
    "atomic_write",
    "atomic_write_text",
    "eval_metrics",
    "expand_files",
    "fraction",
    "gpt2_encoding",
    "gpt2_files",
    "hookimpl",
    "hub_rows",
    "hub_unreachable",
    "metric_scalars",
    "non_negative",
    "one_of",
    "option",
    "positive",
    "quiet_hub_retries",
    "read_rows",
    "read_texts",
    "template_from_description",
    "tokenizer_from_description",
    "tokens_from_text_bytes",
]
