"""A run's own checkpoints: what one holds, when ``last.pth`` is written, resuming.

The core, not a callback, decides what a checkpoint holds (the file format is
``checkpoints.py``'s): weights, optimizer and loss-scaler states, every process's
sampler and random states, every callback's state, and what the run has
measured. The core also writes ``last.pth`` on its own schedule
(``[train] save_every``, every epoch end, and when a run completes or is
stopped), so every run can resume after a kill; callbacks may ask for more
files by name (:meth:`TrainerState.request_save`). :class:`RunCheckpoints`
builds the checkpoint once, writes each file on the main process, and
continues a run from ``last.pth`` when its folder has one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch

from nanogpt_core import __version__
from nanogpt_core.data.plugins import plugin_call
from nanogpt_core.errors import TrainingError
from nanogpt_core.train.callbacks import LAST_CHECKPOINT, RunPaths
from nanogpt_core.train.checkpoints import FORMAT as CHECKPOINT_FORMAT
from nanogpt_core.train.checkpoints import load_checkpoint, save_checkpoint
from nanogpt_core.train.hook_dispatch import HookDispatch
from nanogpt_core.train.resume import callback_states, check_belongs, check_same_config
from nanogpt_core.train.shard_files import (
    load_optimizer_shards,
    save_optimizer_shards,
    sweep_shard_folders,
)
from nanogpt_core.train.sharding import (
    FSDP,
    all_finite,
    full_model_state,
    is_sharded,
    load_full_model_state,
    local,
)
from nanogpt_core.train.throughput import Throughput

if TYPE_CHECKING:
    from nanogpt_core.config.experiment import ExperimentConfig, TrainConfig
    from nanogpt_core.data.prepared import PreparedData
    from nanogpt_core.data.token_windows import BatchSource
    from nanogpt_core.model.gpt import GPT
    from nanogpt_core.train.step_guard import StepGuard

# Param-group keys that choose an optimizer's kernel rather than its update.
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's random states (and its CUDA ``device``'s), as tensors and plain containers."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        # This process's device only: asking for every GPU's state would make each
        # rank initialise every GPU of the node.
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` returned (the CUDA state onto ``device``)."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda")
    if saved is None or device is None or device.type != "cuda":
        return
    if isinstance(saved, (list, tuple)):  # a checkpoint from before: every GPU's state
        index = device.index or 0
        if index >= len(saved):
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved, device)


def load_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    """The saved optimizer state, keeping how this machine runs the update.

    torch restores every key of the saved param groups, ``fused`` and
    ``foreach`` too: a checkpoint written on a CPU would resume unfused on a
    GPU. Those say how the update is computed, not what it is, so this
    run's own choice stays.
    """
    groups = optimizer.param_groups
    kernels = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in groups]
    optimizer.load_state_dict(state)
    if len(optimizer.param_groups) == len(kernels):
        for group, kept in zip(optimizer.param_groups, kernels, strict=True):
            group.update(kept)


def save_interval(train: TrainConfig) -> int:
    """Steps between the core's saves of ``last.pth`` (besides epoch ends); 0 for none.

    ``save_every`` unset saves at every evaluation, as nanoGPT does.
    """
    return train.eval_every if train.save_every is None else train.save_every


def first_save(config: ExperimentConfig, steps_per_epoch: int, total_steps: int) -> int:
    """The first step after which ``last.pth`` is written, as far as the config tells.

    The core's own saves (``save_interval`` and epoch ends) and the built-in
    ``checkpoint`` callback's ``every_steps``: the one saving schedule besides
    the core's that the experiment file states. What other callbacks will ask
    for cannot be known before they run.
    """
    every = [save_interval(config.train), steps_per_epoch]
    for spec in config.callbacks:
        if spec.plugin == "checkpoint":
            every.append(getattr(spec.options, "every_steps", None) or 0)
    return min([total_steps, *(n for n in every if n > 0)])


def unresumable_warning(
    config: ExperimentConfig, steps_per_epoch: int, total_steps: int
) -> str | None:
    """One line when a run killed before its last step could not resume; else None."""
    if total_steps < 2 or first_save(config, steps_per_epoch, total_steps) < total_steps:
        return None
    train = config.train
    now = (
        f"unset, so it follows train.eval_every = {train.eval_every}"
        if train.save_every is None
        else str(train.save_every)
    )
    return (
        f"warning: the core first saves last.pth at the last step ({total_steps}), so a run "
        f"killed before then (kill -9, a crash) cannot resume; set train.save_every below "
        f"{total_steps} to save sooner (now {now})"
    )


class RunCheckpoints:
    """Snapshots the run, writes ``last.pth`` and what callbacks request, resumes from ``last.pth``.

    :param config: the resolved experiment.
    :param data: the prepared data (its tokenizer and fingerprint go in every checkpoint).
    :param model: the unwrapped model.
    :param optimizer: the optimizer (as the accelerator prepared it).
    :param accelerator: the run's ``accelerate.Accelerator``.
    :param sampler: this process's training batches.
    :param hooks: the callbacks and the state they see.
    :param throughput: the run's clock and token counts.
    :param paths: the run's results folder.
    :param echo: prints a line on the main process.
    :param optimizer_who: how messages name the optimizer plugin.
    :param guard: the run's step guard, whose window and counts a checkpoint keeps.
    """

    def __init__(
        self,
        *,
        config: ExperimentConfig,
        data: PreparedData,
        model: GPT,
        optimizer: Any,
        accelerator: Any,
        sampler: BatchSource,
        hooks: HookDispatch,
        throughput: Throughput,
        paths: RunPaths,
        echo: Callable[[str], None],
        optimizer_who: str = "the optimizer",
        guard: StepGuard | None = None,
    ) -> None:
        self.config = config
        self.data = data
        self.model = model
        self.optimizer = optimizer
        self.accelerator = accelerator
        self.sampler = sampler
        self.hooks = hooks
        self.throughput = throughput
        self.paths = paths
        self.echo = echo
        self.optimizer_who = optimizer_who
        self.guard = guard
        # FSDP's layout (optimizer state in DCP shards beside each file) whatever
        # the process count, so a checkpoint resumes at another count.
        self.sharded_layout = config.train.parallelism == FSDP
        self.sharded_model = is_sharded(config.train, accelerator)

    # -- writing -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything a resumed run needs (see ``checkpoints.py``), gathered from every process.

        Every process must call it (it communicates); only tensors and plain
        containers, so ``torch.load(weights_only=True)`` reads it back.
        """
        from accelerate.utils import gather_object

        state = self.hooks.state
        per_rank = {"sampler": self.sampler.state_dict(), "rng": rng_state(self.accelerator.device)}
        ranks = gather_object([per_rank]) if self.accelerator.num_processes > 1 else [per_rank]
        scaler = self.accelerator.scaler
        optimizer_state: dict[str, Any] = {}  # under FSDP: see _save_shards
        if not self.sharded_layout:
            with plugin_call(self.optimizer_who, "state_dict"):
                optimizer_state = self.optimizer.state_dict()
        return {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "model_args": attrs.asdict(self.model.config),
            "model": self._weights(),
            "optimizer": optimizer_state,
            "scaler": scaler.state_dict() if scaler else None,
            "step": state.step,
            "epoch": state.epoch,
            "elapsed_s": self.throughput.elapsed(),
            "metrics": dict(state.metrics),
            "ranks": ranks,
            "callbacks": self.hooks.callback_states(),
            "config": self.config.to_dict(),
            "tokenizer": dict(self.data.tokenizer),
            "template": self.data.meta.get("template"),
            "data": {key: self.data.meta.get(key) for key in ("plugin", "variant", "fingerprint")},
            "guards": self.guard.state_dict() if self.guard else None,
        }

    def _weights(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU (gathered from the shards under FSDP)."""
        if self.sharded_model:
            return full_model_state(self.model)
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def warn_if_unresumable(self) -> None:
        """Say in one line, before training, when a kill before the last step would lose the run."""
        state = self.hooks.state
        warning = unresumable_warning(self.config, state.steps_per_epoch, state.total_steps)
        if warning:
            self.echo(warning)

    def due(self, step: int) -> bool:
        """Whether the core writes ``last.pth`` after ``step``: every ``save_every``, epoch ends."""
        every = save_interval(self.config.train)
        return (every > 0 and step % every == 0) or step % self.hooks.state.steps_per_epoch == 0

    def save_requested(self, *, last: bool = False) -> None:
        """Write the checkpoints callbacks asked for (and ``last.pth`` when ``last``), then ``on_checkpoint``.

        ``last.pth`` is written once per step, however often it is asked for.
        """
        names, self.hooks.requests.saves = self.hooks.requests.saves, []
        if last and LAST_CHECKPOINT not in names:
            names.append(LAST_CHECKPOINT)
        state = self.hooks.state
        if LAST_CHECKPOINT in names and state.last_saved_step == state.step:
            names.remove(LAST_CHECKPOINT)
        if not names:
            return
        self.check_weights_finite()
        checkpoint = self.snapshot()
        written, folders = [], {}
        for name in names:
            path = self.paths.checkpoints / name
            # Under FSDP every process writes its optimizer shards first; the
            # file naming them is renamed into place only once they are whole.
            own = self._save_shards(path, state.step, checkpoint)
            if self.accelerator.is_main_process:
                save_checkpoint(path, own)
                if "shards" in own:
                    folders[name] = own["shards"]["folder"]
            written.append(path)
        if LAST_CHECKPOINT in names:
            self.hooks.update(last_saved_step=self.hooks.state.step)
        for path in written:
            self.hooks.call("on_checkpoint", path)
        if self.sharded_layout and self.accelerator.is_main_process:
            # After on_checkpoint: the folders of files a callback pruned go too.
            sweep_shard_folders(self.paths.checkpoints, folders)

    def _save_shards(self, path: Any, step: int, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """``checkpoint`` as the file ``path`` holds it; under FSDP, its optimizer shards written."""
        if not self.sharded_layout:
            return checkpoint
        with plugin_call(self.optimizer_who, "state_dict"):
            state = self.optimizer.state_dict()
        plain, shards = save_optimizer_shards(state, path, step, self.accelerator)
        return {**checkpoint, "optimizer": plain, "shards": shards}

    def check_weights_finite(self) -> None:
        """Refuse to save weights that are already NaN or infinite."""
        named = list(self.model.named_parameters())
        finite = torch.stack([torch.isfinite(local(param)).all() for _, param in named])
        if self.sharded_model:  # each process sees its own rows: agree on every tensor
            finite = all_finite(self.accelerator, finite)
        if bool(finite.all()):  # one read from the device, not one per tensor
            return
        for (name, _), ok in zip(named, finite.tolist(), strict=True):
            if not ok:
                raise TrainingError(
                    f"weights became non-finite at step {self.hooks.state.step} ({name}); "
                    f"nothing was saved. {self.last_good()}"
                )

    def last_good(self) -> str:
        """A sentence naming the checkpoint a failed run can go back to, if any."""
        saved = self.hooks.state.last_saved_step
        if saved is None:
            return "No checkpoint was saved before."
        return f"The last good checkpoint is step {saved} ({self.paths.last_checkpoint})."

    # -- resuming ------------------------------------------------------------

    def resume(self) -> bool:
        """Continue from ``last.pth`` when the results folder has one; returns whether it did.

        :raises CheckpointError: the file is damaged or incomplete.
        :raises ResumeMismatch: it was made by another experiment.
        """
        path = self.paths.last_checkpoint
        if not path.exists():
            return False
        checkpoint = load_checkpoint(path, resume=True)
        check_belongs(
            path,
            checkpoint,
            model_args=attrs.asdict(self.model.config),
            tokenizer=dict(self.data.tokenizer),
            data_meta=self.data.meta,
        )
        check_same_config(path, checkpoint, self.config.to_dict())
        states = callback_states(path, checkpoint["callbacks"], self.hooks.plugins)
        self._restore(checkpoint, states, path)
        state = self.hooks.state
        self.echo(f"resuming from step {state.step} (epoch {state.epoch}) of {path}")
        return True

    def _restore(
        self, checkpoint: dict[str, Any], states: dict[int, dict[str, Any]], path: Any
    ) -> None:
        if self.sharded_model:
            load_full_model_state(self.model, checkpoint["model"])
        else:
            self.model.load_state_dict(checkpoint["model"])
        optimizer_state = checkpoint["optimizer"]
        if self.sharded_layout:
            with plugin_call(self.optimizer_who, "state_dict"):
                optimizer_state = load_optimizer_shards(
                    self.optimizer, path, checkpoint.get("shards"), optimizer_state
                )
        with plugin_call(self.optimizer_who, "load_state_dict"):
            load_optimizer_state(self.optimizer, optimizer_state)
        if self.accelerator.scaler and checkpoint.get("scaler"):
            self.accelerator.scaler.load_state_dict(checkpoint["scaler"])
        ranks = checkpoint["ranks"]
        rank = self.accelerator.process_index
        if rank < len(ranks):
            self.sampler.load_state_dict(ranks[rank]["sampler"])
            set_rng_state(ranks[rank]["rng"], self.accelerator.device)
        self.hooks.load_callback_states(states)
        if self.guard:  # a checkpoint from before the guards has none: nothing seen yet
            self.guard.load_state_dict(checkpoint.get("guards"))
        step = int(checkpoint["step"])
        metrics = dict(checkpoint["metrics"])
        if "tokens" not in metrics and not self.throughput.fine_tuning:
            # A checkpoint from before `tokens`: pre-training steps all count the same.
            metrics["tokens"] = step * self.throughput.tokens_per_step
        self.hooks.update(
            step=step,
            epoch=int(checkpoint["epoch"]),
            metrics=metrics,
            resumed_from=step,
            last_saved_step=step,
        )
        self.throughput.resume(step, float(checkpoint["elapsed_s"]))
