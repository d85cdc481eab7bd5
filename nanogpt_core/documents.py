"""Deprecated: where the file readers were before 0.2.0; import them from ``nanogpt_core``.

The README of commit b4fbd97 pointed dataset plugins here ("``nanogpt_core.documents``
reads local txt/jsonl/json/parquet files and hub datasets"), so a plugin that
imports this module keeps working, with one warning line naming it, until plugin
API 2.0. The readers themselves live in :mod:`nanogpt_core.data.documents`.
"""

import warnings

from nanogpt_core.data.documents import expand_files, hub_rows, read_rows, read_texts
from nanogpt_core.plugins.contract import PluginAPIDeprecation

__all__ = ["expand_files", "hub_rows", "read_rows", "read_texts"]

warnings.warn(
    "imports nanogpt_core.documents, which plugin API 2.0 removes: import expand_files, "
    "read_rows, read_texts and hub_rows from nanogpt_core instead",
    PluginAPIDeprecation,
    stacklevel=2,
)
