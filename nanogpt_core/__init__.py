"""nanogpt: pre-train GPT models from experiment files, extended by plugins.

A plugin needs only what this module exports: ``hookimpl`` to mark its hook
functions, ``option`` to declare its options, and ``Callback`` for callbacks.
Importing this package never imports torch.
"""

from nanogpt_core.callbacks import Callback, TrainerState
from nanogpt_core.hookspecs import hookimpl
from nanogpt_core.options import option

__version__ = "0.1.0"

__all__ = ["Callback", "TrainerState", "__version__", "hookimpl", "option"]
