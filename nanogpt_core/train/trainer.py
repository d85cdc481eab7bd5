"""The training loop: nanoGPT's recipe, driven by Hugging Face Accelerate.

The same code runs on one CPU, one GPU, or many processes under
``accelerate launch``: Accelerate owns devices, mixed precision, gradient
accumulation and the gradient all-reduce; this module owns the recipe (the
optimizer and schedule plugins the experiment names, clipping, evaluation), the
metrics, and the moments at which callbacks are called. Only the main process
writes files or prints.

What the loop leans on lives beside it: the model and its first weights in
``model_setup.py``, the batches in ``training_data.py``, calling callbacks in
``hook_dispatch.py``, checkpoints and resume in ``checkpointing.py``, tokens/s
and MFU in ``throughput.py``, and stopping on a signal in ``stopping.py``.
"""

from __future__ import annotations

import functools
import json
from types import MappingProxyType
from typing import Any

import torch

from nanogpt_core.config.experiment import ExperimentConfig
from nanogpt_core.data.prepared import PreparedData
from nanogpt_core.files import atomic_write_text
from nanogpt_core.plugins.registry import Plugins
from nanogpt_core.train import sharding
from nanogpt_core.train.callbacks import Callback, Requests, RunPaths, TrainerState
from nanogpt_core.train.checkpointing import RunCheckpoints
from nanogpt_core.train.hook_dispatch import HookDispatch
from nanogpt_core.train.loss_estimate import estimate_loss
from nanogpt_core.train.metrics import MetricsLog
from nanogpt_core.train.model_setup import build_model, model_config_for
from nanogpt_core.train.optimization import (
    LearningRates,
    make_optimizer,
    make_schedule,
    optimizer_step,
    optimizer_who,
)
from nanogpt_core.train.step_guard import StepGuard, agree, finite_or_none
from nanogpt_core.train.stopping import StopRequest, TrainingInterrupted
from nanogpt_core.train.throughput import Throughput
from nanogpt_core.train.training_data import steps_per_epoch, to_device, training_batches


def step_metrics(
    previous: Any, loss: float, grad_norm: float, rates: dict[str, float], tokens: int
) -> dict[str, Any]:
    """The metrics after a step: the previous ones, updated with this step's figures.

    A loss or norm that is not finite (a step the guards skipped) is None, so
    ``metrics.jsonl`` holds ``null`` rather than an invalid ``NaN``.
    """
    return {
        **previous,
        "train_loss": finite_or_none(loss),
        **rates,
        "grad_norm": finite_or_none(grad_norm),
        "tokens": previous.get("tokens", 0) + tokens,
    }


class Trainer:
    """Trains a GPT on prepared data, calls the experiment's callbacks, owns saving and resume.

    Everything is built in the constructor (model, optimizer, samplers, state), so
    a ``Trainer`` is whole before :meth:`fit` runs. The trainer, not a callback,
    decides what a checkpoint holds and writes ``last.pth`` itself (every
    ``train.save_every`` steps, at epoch ends, at the end and on a stop), writes
    the files callbacks request through :meth:`TrainerState.request_save`, and
    continues from ``last.pth`` when the results folder has one (see
    :class:`RunCheckpoints`).

    :param config: the resolved experiment.
    :param data: the prepared dataset.
    :param callbacks: the enabled callbacks, in the experiment's order.
    :param paths: the run's results folder.
    :param accelerator: an ``accelerate.Accelerator`` built for ``config.train``.
    :param progress: show a progress bar on the main process.
    :param plugins: where the optimizer and schedule are looked up.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        data: PreparedData,
        callbacks: list[Callback],
        paths: RunPaths,
        accelerator: Any,
        *,
        progress: bool = True,
        plugins: Plugins,
    ) -> None:
        from accelerate.utils import set_seed

        self.config = config
        self.data = data
        self.paths = paths
        self.accelerator = accelerator
        self.progress = progress
        self.plugins = plugins
        self.train_cfg = train = config.train
        self.fine_tuning = data.meta.get("kind", "tokens") == "examples"
        self.is_main = accelerator.is_main_process
        self.metrics_log = MetricsLog(paths.metrics, enabled=self.is_main)
        # Same seed on every rank: identical initial weights everywhere.
        set_seed(config.seed)
        self.model_config = model_config_for(config, data)
        self.sharded = sharding.is_sharded(train, accelerator)
        self.raw_model = self._build_model()
        self.optimizer_who = optimizer_who(plugins, train)
        self.model, self.optimizer = self._prepare_for_training()
        # Updates the weights (through the fp16 loss scaler when there is one), then
        # drops the gradients; the step guard calls it for a step it keeps.
        self._optimizer_step = functools.partial(optimizer_step, self.optimizer, self.optimizer_who)
        if accelerator.num_processes > 1:
            # The same weights came from the same seed; from here on each process
            # draws its own dropout masks (one process keeps its stream as it was).
            torch.manual_seed(config.seed + accelerator.process_index)
        self.sampler = training_batches(
            config, data, self.model_config, accelerator, fine_tuning=self.fine_tuning
        )
        self.steps_per_epoch = steps_per_epoch(train, self.sampler)
        self.total_steps = train.epochs * self.steps_per_epoch
        self.learning_rates = LearningRates.for_run(
            *make_schedule(plugins, train), self.optimizer, train, self.total_steps
        )
        self.throughput = Throughput.for_run(
            train, self.raw_model, accelerator, self.sampler, fine_tuning=self.fine_tuning
        )
        self.peak_flops = self.throughput.peak_flops  # None: no MFU
        requests = Requests()
        state = TrainerState(
            config=config,
            paths=paths,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            model=self.raw_model,
            optimizer=self.optimizer,
            accelerator=accelerator,
            tokenizer=dict(data.tokenizer),
            template=data.meta.get("template"),
            data=data,
            is_main_process=self.is_main,
            requests=requests,
        )
        plugin_names = [spec.plugin for spec in config.callbacks]
        self.hooks = HookDispatch(
            state, requests, callbacks, plugin_names, self.metrics_log, self.elapsed, self.echo
        )
        self.guard = StepGuard.for_run(
            train, self.optimizer, accelerator.scaler, lambda: self.checkpoints.last_good()
        )
        self.checkpoints = RunCheckpoints(
            config=config,
            data=data,
            model=self.raw_model,
            optimizer=self.optimizer,
            accelerator=accelerator,
            sampler=self.sampler,
            hooks=self.hooks,
            throughput=self.throughput,
            paths=paths,
            echo=self.echo,
            optimizer_who=self.optimizer_who,
            guard=self.guard,
        )

    @property
    def state(self) -> TrainerState:
        """What callbacks see now (steps done, metrics, status, ...)."""
        return self.hooks.state

    def echo(self, message: str | None) -> None:
        """Print a line on the main process without breaking the progress bar (None: nothing)."""
        if self.is_main and message:
            from tqdm import tqdm

            tqdm.write(message)

    def elapsed(self) -> float:
        """Seconds of training so far, across resumes."""
        return self.throughput.elapsed()

    # -- set-up --------------------------------------------------------------

    def _build_model(self) -> torch.nn.Module:
        # A run that resumes takes its weights from its own last.pth, never init_from again.
        resuming = self.paths.last_checkpoint.exists()
        init_from = None if resuming else self.config.model.init_from
        model = build_model(self.model_config, init_from, self.data.tokenizer, self.echo)
        model.activation_checkpointing = self.train_cfg.activation_checkpointing
        return model.to(self.accelerator.device)

    def _prepare_for_training(self) -> tuple[Any, Any]:
        device_type = self.accelerator.device.type
        return sharding.prepare_for_training(
            self.raw_model,
            lambda model: make_optimizer(self.plugins, self.train_cfg, model, device_type),
            self.accelerator,
            compile_model=self.train_cfg.compile,
            sharded=self.sharded,
            who=self.optimizer_who,
        )

    # -- the loop ------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to the end (or to a stop request) and return the last metrics.

        :raises TrainingInterrupted: SIGTERM or Ctrl-C stopped the run (exit 130).
        """
        from tqdm import tqdm

        stop = StopRequest()
        processes = self.accelerator.num_processes
        status = "failed"
        self.throughput.start()
        try:
            with stop.installed():
                self._start()
                bar = tqdm(
                    total=self.total_steps,
                    initial=self.state.step,
                    unit="step",
                    disable=not (self.is_main and self.progress),
                    dynamic_ncols=True,
                )
                with bar:
                    while self.state.step < self.total_steps and not stop.stopping(processes):
                        self._step(bar, stop)
            status = "interrupted" if stop.stopping(processes) else "completed"
        finally:
            self._finish(status)
        if status == "interrupted":
            state = self.state
            raise TrainingInterrupted(
                stop.message(state.step, state.last_saved_step, self.paths.last_checkpoint)
            )
        return dict(self.state.metrics)

    def _start(self) -> None:
        """Resume if the folder has a ``last.pth``, record the experiment, then ``on_train_start``."""
        self.checkpoints.warn_if_unresumable()
        self.checkpoints.resume()
        if self.is_main:  # only once the checkpoint is known to belong to this experiment
            atomic_write_text(self.paths.config, json.dumps(self.config.to_dict(), indent=2) + "\n")
        # Before any callback may log: a line appended after a torn one would be lost.
        torn = self.metrics_log.truncate_after(self.state.step)
        if torn:
            self.echo(f"{self.paths.metrics}: dropped {torn} unreadable line(s) (a torn write)")
        self.hooks.call("on_train_start")
        self._save()
        self.model.train()

    def _step(self, bar: Any, stop: StopRequest) -> None:
        """One optimizer step: forward and backward, clip, step, evaluate, log, save."""
        train = self.train_cfg
        step = self.state.step + 1
        epoch = (step - 1) // self.steps_per_epoch + 1
        rates = self.set_learning_rates(step - 1)
        loss = self._forward_backward()
        grad_norm = self._clip_gradients()
        # Before the optimizer step: every process skips a bad step alike (step_guard.py).
        loss, grad_norm, stop.agreed = agree(
            self.accelerator, loss, grad_norm, stop=stop.requested is not None
        )
        self.echo(self.guard.step(step, loss, grad_norm, self._optimizer_step))
        metrics = step_metrics(
            self.state.metrics, loss, grad_norm, rates, self.throughput.tokens_of_step()
        )
        metrics["skipped_steps"] = self.guard.skipped
        evaluate = step % train.eval_every == 0 or step == self.total_steps
        record = None
        if evaluate or step % train.log_every == 0:
            # tokens/s since the last line, measured before this step's evaluation.
            speed = self.throughput.since_last_log(step)
            losses = self.evaluate(step, epoch) if evaluate else {}
            record = self.metrics_log.append_step(
                step, epoch, metrics, {**speed, **losses}, self.elapsed()
            )
            metrics.update({k: v for k, v in record.items() if k not in ("step", "epoch")})
            bar.set_postfix(
                epoch=epoch, loss=f"{loss:.4f}", tok_s=f"{speed['tokens_per_sec']:,.0f}"
            )
        self.hooks.update(
            step=step,
            epoch=epoch,
            metrics=metrics,
            record=MappingProxyType(record) if record else None,
        )
        bar.update(1)
        self.hooks.step_ended(evaluated=evaluate, epoch_ended=step % self.steps_per_epoch == 0)
        self._save(last=self.checkpoints.due(step))

    def set_learning_rates(self, step: int) -> dict[str, float]:
        """Each param group's ``lr`` for the 0-based ``step``, from the schedule.

        :returns: the ``lr`` metrics: the first group's rate, and each group's
            (``lr/<name or index>``) where their peaks differ.
        """
        return self.learning_rates.apply(self.optimizer.param_groups, step)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

        The learning rates are the param groups' as they are: see :meth:`set_learning_rates`.

        :returns: the loss (averaged over micro-batches and processes) and the
            gradient norm before clipping.
        """
        loss = self._forward_backward()
        grad_norm = self._clip_gradients()
        loss, grad_norm, _ = agree(self.accelerator, loss, grad_norm, stop=False)
        self.echo(self.guard.step(self.state.step + 1, loss, grad_norm, self._optimizer_step))
        return loss, grad_norm

    def _forward_backward(self) -> torch.Tensor:
        """The micro-steps: forward and backward on each, reading nothing back from the device.

        Accelerate scales each loss by the number of micro-steps and, under
        several processes, all-reduces the gradients only on the last one
        (under FSDP the model itself is told to reduce-scatter only then).

        :returns: this process's loss, averaged over the micro-steps, as a device tensor.
        """
        acc = self.accelerator
        micro_steps = self.train_cfg.gradient_accumulation_steps
        loss_sum = torch.zeros((), device=acc.device)
        for index in range(micro_steps):
            x, y = to_device(*self.sampler.next_batch(), acc.device)
            with sharding.micro_step(
                acc, self.model, last=index == micro_steps - 1, sharded=self.sharded
            ):
                with acc.autocast():
                    _, loss = self.model(x, y)
                loss_sum += loss.detach().float()
                acc.backward(loss)
        # The last micro-step left `acc.sync_gradients` True: the gradients are whole,
        # so the clip and the wrapped optimizer's step and zero_grad below act.
        return loss_sum / micro_steps

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the gradient norm to ``grad_clip`` (0: never); returns the norm before clipping.

        Under fp16, Accelerate unscales the gradients first, so the norm and the
        clip are in true units and the scaler's step does not unscale again.
        Under FSDP the norm is the whole model's, from every process's shards.
        """
        clip = self.train_cfg.grad_clip
        return sharding.clip_gradients(self.accelerator, self.raw_model, clip, sharded=self.sharded)

    def evaluate(self, step: int, epoch: int) -> dict[str, float]:
        """Estimate the train and val losses and print them: ``{"train_loss": ..., "val_loss": ...}``."""
        losses = self.estimate_loss()
        self.echo(
            f"step {step}/{self.total_steps} (epoch {epoch}): "
            f"train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}"
        )
        return losses

    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over ``eval_batches`` fixed batches of each split, averaged over processes.

        For fine-tuning data the batches are whole examples and the loss is on
        their response tokens.
        """
        block_size = self.model_config.block_size
        return estimate_loss(self.model, self.data, self.config, block_size, self.accelerator)

    def _save(self, *, last: bool = False) -> None:
        """Write the checkpoints of this round of hooks, after the metrics callbacks logged.

        :param last: the core's own ``last.pth`` is due (written once with what
            callbacks asked, and never twice for one step).
        """
        self.hooks.write_logged()
        self.checkpoints.save_requested(last=last)
        self.hooks.write_logged()  # what on_checkpoint asked

    def _finish(self, status: str) -> None:
        """``on_train_end`` for every callback; then ``last.pth`` and what they asked, unless the run failed.

        A completed or stopped run saves the step it ended at (once: an epoch
        end saved it already); a failed run saves nothing.
        """
        if status == "failed":
            self.hooks.end_failed_run()
            return
        self.hooks.update(status=status)
        self.hooks.call("on_train_end")
        self._save(last=self.state.step > 0)
