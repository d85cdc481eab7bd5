"""Transitional: the experiment names that ``nanogpt_core.config`` used to define.

The experiment file code now lives in modules of one concept each:

- :mod:`nanogpt_core.experiment_config`: the option tables (``ExperimentConfig``,
  ``ModelConfig``, ``TrainConfig``, ``PluginSpec``);
- :mod:`nanogpt_core.experiment_file`: reading a file (TOML, ``extends``,
  ``load_experiment``);
- :mod:`nanogpt_core.experiment_paths`: relative paths, resolved against the file
  that set them;
- :mod:`nanogpt_core.overrides`: ``--set KEY=VALUE``;
- :mod:`nanogpt_core.plugin_options`: plugin tables checked against their plugins'
  options classes.

Import from those. This module keeps only the names that ``trainer``,
``datasets``, ``examples`` and ``cli`` import while they are being split
elsewhere; it goes once they import from the modules above.
"""

from nanogpt_core.experiment_config import ExperimentConfig, ModelConfig, PluginSpec, TrainConfig
from nanogpt_core.experiment_file import load_experiment

__all__ = ["ExperimentConfig", "ModelConfig", "PluginSpec", "TrainConfig", "load_experiment"]
