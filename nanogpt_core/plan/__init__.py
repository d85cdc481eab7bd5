"""What a run will need before it starts: ``gpt plan`` and the line ``gpt run`` prints.

From the experiment file alone (and the prepared data, when there is some) the
plan works out the model's size and FLOPs, the tokens the run trains on and
how many passes that makes over its data, the memory each process needs (the
project's one estimate, :mod:`nanogpt_core.train.memory`), the wall time at an
assumed model FLOPs utilisation, and the disk its data and checkpoints fill.

- :mod:`~nanogpt_core.plan.hardware`: the GPUs a plan is for (``--gpus 8xV100-32GB``).
- :mod:`~nanogpt_core.plan.figures`: the plan's figures, section by section.
- :mod:`~nanogpt_core.plan.planner`: :func:`make_plan`, which gathers what they need.
- :mod:`~nanogpt_core.plan.report`: the table, the JSON and the one-line summary.
"""
