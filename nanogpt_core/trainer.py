"""The training loop: nanoGPT's recipe, driven by Hugging Face Accelerate.

The same code runs on one CPU, one GPU, or many processes under
``accelerate launch``: Accelerate owns devices, mixed precision, gradient
accumulation and the gradient all-reduce; this module owns the recipe (the
optimizer and schedule plugins the experiment names, clipping, evaluation), the
metrics, and the moments at which callbacks are called. Only the main process
writes files or prints.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
import numpy as np
import torch

from nanogpt_core import __version__
from nanogpt_core.callbacks import LAST_CHECKPOINT, Callback, Requests, RunPaths, TrainerState
from nanogpt_core.checkpoints import FORMAT as CHECKPOINT_FORMAT
from nanogpt_core.checkpoints import LATER_MODEL_ARGS, load_checkpoint, save_checkpoint
from nanogpt_core.config import ExperimentConfig, TrainConfig
from nanogpt_core.errors import NanoGPTError, PluginFault, TrainingError
from nanogpt_core.evaluation import EVAL_SEED_OFFSET, fixed_loss_batches
from nanogpt_core.example_batches import ExampleBatches
from nanogpt_core.gpus import capability, peak_flops
from nanogpt_core.metrics import MetricsLog
from nanogpt_core.model import GPT, GPTConfig
from nanogpt_core.optimization import LearningRates, make_optimizer, make_schedule
from nanogpt_core.options import show
from nanogpt_core.plugins import Plugins, load_plugins
from nanogpt_core.prepared_data import PreparedData
from nanogpt_core.resume import callback_states, check_belongs, tokenizer_difference
from nanogpt_core.sampler import BatchSource, MemmapSampler

# Param-group keys that choose an optimizer's kernel rather than its update.
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")
# Optimizer steps per epoch of pre-training data when the experiment leaves it out.
DEFAULT_STEPS_PER_EPOCH = 1000


class TrainingInterrupted(NanoGPTError):
    """SIGTERM or Ctrl-C stopped the run after a clean save: exit status 130."""

    exit_code = 130


def device_peak_flops(device: torch.device, mixed_precision: str) -> float | None:
    """The tensor-core peak of this process's ``device`` (None on the CPU or unknown GPUs)."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), mixed_precision, capability(device))


def steps_per_epoch(train: TrainConfig, source: Any) -> int:
    """``train.steps_per_epoch``, or what the data gives when the experiment leaves it out.

    Fine-tuning data: one pass over the examples (``batches_per_epoch`` batches,
    ``gradient_accumulation_steps`` per optimizer step). Pre-training windows
    are random, so an epoch is a fixed number of steps.
    """
    if train.steps_per_epoch is not None:
        return train.steps_per_epoch
    batches = getattr(source, "batches_per_epoch", None)
    if batches is None:
        return DEFAULT_STEPS_PER_EPOCH
    return max(1, math.ceil(batches / train.gradient_accumulation_steps))


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """``vocab_size`` rounded up to a multiple of 64, as nanoGPT does for speed."""
    return ((vocab_size + multiple - 1) // multiple) * multiple


def model_config_for(config: ExperimentConfig, data: PreparedData) -> GPTConfig:
    """The model's architecture: the experiment's ``[model]`` plus the data's vocabulary."""
    model = config.model
    vocab_size = model.vocab_size or padded_vocab_size(data.vocab_size)
    if vocab_size < data.vocab_size:
        raise NanoGPTError(
            f"model.vocab_size = {vocab_size} is smaller than the data's vocabulary of "
            f"{data.vocab_size}; remove it to use the data's (padded)"
        )
    # rope_theta left out keeps GPTConfig's default (it is not used with learned positions).
    rope_theta = {} if model.rope_theta is None else {"rope_theta": model.rope_theta}
    return GPTConfig(
        block_size=model.block_size,
        vocab_size=vocab_size,
        n_layer=model.n_layer,
        n_head=model.n_head,
        n_embd=model.n_embd,
        dropout=model.dropout,
        bias=model.bias,
        position=model.position,
        norm=model.norm,
        mlp=model.mlp,
        qk_norm=model.qk_norm,
        tie_embeddings=model.tie_embeddings,
        logit_softcap=model.logit_softcap,
        **rope_theta,
    )


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


class StopRequest:
    """Turns SIGTERM and a first Ctrl-C into a request to stop after the current step."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once
        self.requested = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle the signals inside the ``with`` block (main thread only)."""
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


class Trainer:
    """Trains a GPT on prepared data, calls the experiment's callbacks, owns resume.

    Everything is built in the constructor (model, optimizer, samplers, state), so
    a ``Trainer`` is whole before :meth:`fit` runs. The trainer, not a callback,
    decides what a checkpoint holds, writes the files callbacks request through
    :meth:`TrainerState.request_save`, and continues from ``last.pth`` when the
    results folder has one.

    :param config: the resolved experiment.
    :param data: the prepared dataset.
    :param callbacks: the enabled callbacks, in the experiment's order.
    :param paths: the run's results folder.
    :param accelerator: an ``accelerate.Accelerator`` built for ``config.train``.
    :param progress: show a progress bar on the main process.
    :param plugins: where the optimizer and schedule are looked up (the installed
        plugins when None).
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
        plugins: Plugins | None = None,
    ) -> None:
        from accelerate.utils import set_seed

        self.config = config
        self.data = data
        self.callbacks = callbacks
        self.callback_plugins = [spec.plugin for spec in config.callbacks]
        self.paths = paths
        self.accelerator = accelerator
        self.progress = progress
        self.plugins = plugins if plugins is not None else load_plugins()
        self.train_cfg = config.train
        self.fine_tuning = data.meta.get("kind", "tokens") == "examples"
        self.is_main = accelerator.is_main_process
        self.metrics_log = MetricsLog(paths.metrics, enabled=self.is_main)
        self.elapsed_before = 0.0
        self.started = time.perf_counter()
        self.throughput_mark = (self.started, 0)
        # Same seed on every rank: identical initial weights everywhere.
        set_seed(config.seed)
        self.model_config = model_config_for(config, data)
        self.raw_model = self._build_model()
        self.model, self.optimizer = self._prepare_for_training()
        if accelerator.num_processes > 1:
            # The same weights came from the same seed; from here on each process
            # draws its own dropout masks (one process keeps its stream as it was).
            torch.manual_seed(config.seed + accelerator.process_index)
        self.stop_agreed = False
        self.sampler: BatchSource = self._build_train_source()
        self.steps_per_epoch = steps_per_epoch(config.train, self.sampler)
        self.total_steps = self.train_cfg.epochs * self.steps_per_epoch
        self.learning_rates = LearningRates.for_run(
            *make_schedule(self.plugins, self.train_cfg),
            self.optimizer,
            self.train_cfg,
            self.total_steps,
        )
        self.peak_flops = self.train_cfg.peak_flops or device_peak_flops(
            accelerator.device, accelerator.mixed_precision
        )
        self.flops_per_token = self.raw_model.flops_per_token()
        # Pre-training steps all train on the same number of tokens, on all processes together.
        self.tokens_per_step = (
            self.train_cfg.batch_size
            * self.model_config.block_size
            * self.train_cfg.gradient_accumulation_steps
            * accelerator.num_processes
        )
        self.requests = Requests()
        self.state = TrainerState(
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
            requests=self.requests,
        )

    # -- output --------------------------------------------------------------

    def echo(self, message: str) -> None:
        """Print a line on the main process without breaking the progress bar."""
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(message)

    # -- set-up --------------------------------------------------------------

    def _build_model(self) -> GPT:
        model = GPT(self.model_config)
        # A run that resumes takes its weights from its own last.pth, never init_from again.
        if self.config.model.init_from and not self.paths.last_checkpoint.exists():
            self._init_from(model, self.config.model.init_from)
        total = model.num_params()
        non_embedding = model.num_params(non_embedding=True)
        self.echo(
            f"model: {total / 1e6:.2f}M parameters ({non_embedding / 1e6:.2f}M non-embedding)"
        )
        return model.to(self.accelerator.device)

    def _prepare_for_training(self) -> tuple[Any, Any]:
        train = self.train_cfg
        optimizer = make_optimizer(
            self.plugins, train, self.raw_model, self.accelerator.device.type
        )
        model: torch.nn.Module = self.raw_model
        if train.compile:
            model = torch.compile(model)
        return self.accelerator.prepare(model, optimizer)

    def _build_train_source(self) -> BatchSource:
        if self.fine_tuning:
            return self._example_batches("train", self.config.seed)
        sampler = self._build_sampler("train", self.config.seed + self.accelerator.process_index)
        self._build_sampler("val", 0)  # checks val once; evaluation draws its own fixed batches
        return sampler

    def _example_batches(self, split: str, seed: int, *, grouped: bool = True) -> ExampleBatches:
        eot = self.data.tokenizer.get("eot_id")
        return ExampleBatches(
            self.data.split_path(split),
            self.data.dtype,
            self.data.examples(split),
            self.train_cfg.batch_size,
            seed=seed,
            rank=self.accelerator.process_index,
            world=self.accelerator.num_processes,
            pad_id=eot if isinstance(eot, int) else 0,
            group_by_length=grouped and self.train_cfg.group_by_length,
        )

    def _build_sampler(self, split: str, seed: int) -> MemmapSampler:
        return MemmapSampler(
            self.data.split_path(split),
            self.data.dtype,
            self.model_config.block_size,
            self.train_cfg.batch_size,
            seed=seed,
            vocab_size=self.model_config.vocab_size,
        )

    def _init_from(self, model: GPT, source: str) -> None:
        """Start from a toolkit checkpoint's weights or a Hugging Face GPT-2 folder."""
        if Path(source).is_file():
            self._init_from_checkpoint(model, Path(source))
        else:
            self._init_from_hf(model, source)

    def _init_from_checkpoint(self, model: GPT, path: Path) -> None:
        """Weights only (a fresh optimizer), after checking shape and tokenizer."""
        checkpoint = load_checkpoint(path)
        theirs = checkpoint["model_args"]
        ours = asdict(self.model_config)
        # Everything that shapes the weights or what they compute; load_checkpoint
        # gave an older checkpoint the defaults of options it predates.
        keys = ["n_layer", "n_head", "n_embd", "bias", "vocab_size", *LATER_MODEL_ARGS]
        differences = [
            f"model.{key} = {show(ours[key])} but {path} has {show(theirs[key])}"
            for key in keys
            if ours[key] != theirs[key] and not (key == "rope_theta" and ours["position"] != "rope")
        ]
        # Learned positions have no weights past the trained context; RoPE has none at all.
        if ours["position"] == "learned" and ours["block_size"] > theirs["block_size"]:
            differences.append(
                f"model.block_size = {ours['block_size']} is longer than the "
                f"{theirs['block_size']} {path} was trained with"
            )
        difference = tokenizer_difference(checkpoint["tokenizer"], dict(self.data.tokenizer))
        if difference:
            differences.append(f"{difference} (the dataset's tokenizer must be the checkpoint's)")
        if differences:
            raise NanoGPTError("model.init_from: " + "; ".join(differences))
        weights = dict(checkpoint["model"])
        if "transformer.wpe.weight" in weights:
            # A shorter context keeps the first positions, as with a Hugging Face folder.
            wpe = weights["transformer.wpe.weight"]
            weights["transformer.wpe.weight"] = wpe[: ours["block_size"]]
        model.load_state_dict(weights)
        self.echo(f"model.init_from: weights of step {checkpoint['step']} of {path}")

    def _init_from_hf(self, model: GPT, folder: str) -> None:
        from nanogpt_core.hf_gpt2 import (
            config_from_hf,
            from_hf_state_dict,
            gpt2_mismatches,
            read_hf_folder,
        )

        unlike_gpt2 = gpt2_mismatches(self.model_config)
        if unlike_gpt2:
            raise NanoGPTError(
                f"model.init_from: {folder}: a Hugging Face folder starts only a GPT-2, and "
                f"{', '.join('model.' + m for m in unlike_gpt2)} "
                f"{'has' if len(unlike_gpt2) == 1 else 'have'} no place in GPT-2; "
                "use GPT-2's options (the defaults) or start from a toolkit checkpoint"
            )
        hf_config, state = read_hf_folder(folder)
        theirs = config_from_hf(hf_config)
        differences = [
            f"model.{key} = {getattr(self.model_config, key)} but {folder} has {getattr(theirs, key)}"
            for key in ("n_layer", "n_head", "n_embd", "bias", "tie_embeddings")
            if getattr(self.model_config, key) != getattr(theirs, key)
        ]
        if self.model_config.block_size > theirs.block_size:
            differences.append(
                f"model.block_size {self.model_config.block_size} > {theirs.block_size}"
            )
        if self.model_config.vocab_size != theirs.vocab_size:
            differences.append(
                f"model.vocab_size = {self.model_config.vocab_size} but {folder} has {theirs.vocab_size}"
            )
        if differences:
            raise NanoGPTError("model.init_from: " + "; ".join(differences))
        from_hf_state_dict(model, state)

    # -- checkpoints ---------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        """Everything a resumed run needs (see ``checkpoints.py``), gathered from every process.

        Every process must call it (it communicates); only tensors and plain
        containers, so ``torch.load(weights_only=True)`` reads it back.
        """
        from accelerate.utils import gather_object

        per_rank = {
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(self.accelerator.device),
        }
        ranks = gather_object([per_rank]) if self.accelerator.num_processes > 1 else [per_rank]
        return {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "model_args": asdict(self.model_config),
            "model": {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "elapsed_s": self.elapsed(),
            "metrics": dict(self.state.metrics),
            "ranks": ranks,
            "callbacks": [
                {"position": i, "plugin": plugin, "state": callback.state_dict()}
                for i, (plugin, callback) in enumerate(
                    zip(self.callback_plugins, self.callbacks, strict=True)
                )
            ],
            "config": self.config.to_dict(),
            "tokenizer": dict(self.data.tokenizer),
            "template": self.data.meta.get("template"),
            "data": {key: self.data.meta.get(key) for key in ("plugin", "variant", "fingerprint")},
        }

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
            model_args=asdict(self.model_config),
            tokenizer=dict(self.data.tokenizer),
            data_meta=self.data.meta,
        )
        states = callback_states(path, checkpoint["callbacks"], self.callback_plugins)
        self._restore(checkpoint, states)
        self.echo(f"resuming from step {self.state.step} (epoch {self.state.epoch}) of {path}")
        return True

    def _restore(self, checkpoint: dict[str, Any], states: dict[int, dict[str, Any]]) -> None:
        self.raw_model.load_state_dict(checkpoint["model"])
        self._load_optimizer_state(checkpoint["optimizer"])
        if self.accelerator.scaler and checkpoint.get("scaler"):
            self.accelerator.scaler.load_state_dict(checkpoint["scaler"])
        self.elapsed_before = float(checkpoint["elapsed_s"])
        ranks = checkpoint["ranks"]
        rank = self.accelerator.process_index
        if rank < len(ranks):
            self.sampler.load_state_dict(ranks[rank]["sampler"])
            set_rng_state(ranks[rank]["rng"], self.accelerator.device)
        for position, state in states.items():
            self.callbacks[position].load_state_dict(state)
        step = int(checkpoint["step"])
        metrics = dict(checkpoint["metrics"])
        if "tokens" not in metrics and not self.fine_tuning:  # a checkpoint from before `tokens`
            metrics["tokens"] = step * self.tokens_per_step
        self._update(
            step=step,
            epoch=int(checkpoint["epoch"]),
            metrics=metrics,
            resumed_from=step,
            last_saved_step=step,
        )
        self.throughput_mark = (time.perf_counter(), step)

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        """The saved optimizer state, keeping how this machine runs the update.

        torch restores every key of the saved param groups, ``fused`` and
        ``foreach`` too: a checkpoint written on a CPU would resume unfused on a
        GPU. Those say how the update is computed, not what it is, so this
        run's own choice stays.
        """
        groups = self.optimizer.param_groups
        kernels = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in groups]
        self.optimizer.load_state_dict(state)
        if len(self.optimizer.param_groups) == len(kernels):
            for group, kept in zip(self.optimizer.param_groups, kernels, strict=True):
                group.update(kept)

    def _save_requested(self) -> None:
        """Write the checkpoints callbacks asked for, then tell the callbacks."""
        names, self.requests.saves = self.requests.saves, []
        if not names:
            return
        self._check_weights_finite()
        checkpoint = self._snapshot()
        written = []
        for name in names:
            path = self.paths.checkpoints / name
            if self.is_main:
                save_checkpoint(path, checkpoint)
            written.append(path)
        if LAST_CHECKPOINT in names:
            self._update(last_saved_step=self.state.step)
        for path in written:
            self._call("on_checkpoint", path)

    def _end_round(self) -> None:
        """Do what callbacks asked in this round of hooks: their metrics line, then checkpoints."""
        self._write_logged()
        self._save_requested()
        self._write_logged()  # what on_checkpoint asked

    def _write_logged(self) -> None:
        """One ``metrics.jsonl`` line with the metrics callbacks logged, then ``on_metrics``."""
        logged, self.requests.metrics = self.requests.metrics, {}
        if not logged:
            return
        record: dict[str, Any] = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "tokens": self.state.metrics.get("tokens", 0),
            **logged,
            "elapsed_s": self.elapsed(),
        }
        self.metrics_log.append(record)
        self._update(metrics={**self.state.metrics, **logged})
        self._call("on_metrics", MappingProxyType(record))

    def _check_weights_finite(self) -> None:
        """Refuse to save weights that are already NaN or infinite."""
        named = list(self.raw_model.named_parameters())
        finite = torch.stack([torch.isfinite(param).all() for _, param in named])
        if bool(finite.all()):  # one read from the device, not one per tensor
            return
        for (name, _), ok in zip(named, finite.tolist(), strict=True):
            if not ok:
                raise TrainingError(
                    f"weights became non-finite at step {self.state.step} ({name}); nothing "
                    f"was saved. {self._last_good()}"
                )

    def _last_good(self) -> str:
        if self.state.last_saved_step is None:
            return "No checkpoint was saved before."
        return (
            f"The last good checkpoint is step {self.state.last_saved_step} "
            f"({self.paths.last_checkpoint})."
        )

    # -- callbacks -----------------------------------------------------------

    def _update(self, **changes: Any) -> None:
        self.state = attrs.evolve(self.state, **changes)

    def _call(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every enabled callback, in the experiment's order.

        Text a callback adds is folded into the state before the next one runs.
        An exception becomes one :class:`PluginFault` line naming the callback.
        """
        for position, (plugin, callback) in enumerate(
            zip(self.callback_plugins, self.callbacks, strict=True)
        ):
            try:
                getattr(callback, hook)(self.state, *args)
            except (NanoGPTError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise PluginFault(
                    f"callback {plugin!r} (callbacks[{position}]) failed in {hook}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if self.requests.texts:
                texts, self.requests.texts = tuple(self.requests.texts), []
                self._update(texts=self.state.texts + texts)

    def _finish(self, status: str) -> None:
        """``on_train_end`` for every callback; then save what they asked, unless the run failed."""
        self._update(status=status)
        if status == "failed":
            self.requests.saves.clear()
            self.requests.metrics.clear()
            for plugin, callback in zip(self.callback_plugins, self.callbacks, strict=True):
                try:
                    callback.on_train_end(self.state)
                except Exception as exc:  # the first error is the one to report
                    self.echo(f"warning: callback {plugin!r} failed in on_train_end: {exc}")
            self.requests.saves.clear()
            self.requests.metrics.clear()
            return
        self._call("on_train_end")
        self._end_round()

    # -- the loop ------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds of training so far, across resumes."""
        return self.elapsed_before + (time.perf_counter() - self.started)

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over ``eval_batches`` fixed batches of each split, averaged over processes.

        For fine-tuning data the batches are whole examples and the loss is on
        their response tokens.
        """
        out: dict[str, float] = {}
        self.model.eval()
        for split in ("train", "val"):
            losses = [loss.float() for loss in self._eval_losses(split)]
            mean = torch.stack(losses).mean()
            out[f"{split}_loss"] = self.accelerator.reduce(mean, reduction="mean").item()
        self.model.train()
        return out

    def _eval_batches(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same fixed batches at every evaluation, never touching the training stream."""
        return fixed_loss_batches(
            self.data,
            split,
            seed=self.config.seed + EVAL_SEED_OFFSET,
            batch_size=self.train_cfg.batch_size,
            block_size=self.model_config.block_size,
            count=self.train_cfg.eval_batches,
            rank=self.accelerator.process_index,
            world=self.accelerator.num_processes,
        )

    def _eval_losses(self, split: str) -> Iterator[torch.Tensor]:
        for x, y in self._eval_batches(split):
            x, y = x.to(self.accelerator.device), y.to(self.accelerator.device)
            with self.accelerator.autocast():
                _, loss = self.model(x, y)
            yield loss

    def set_learning_rates(self, step: int) -> float:
        """Each param group's ``lr`` for the 0-based ``step``, from the schedule.

        :returns: the learning rate of ``train.learning_rate`` at this step (the
            ``lr`` metric).
        """
        return self.learning_rates.apply(self.optimizer.param_groups, step)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

        The learning rates are the param groups' as they are: see :meth:`set_learning_rates`.

        :returns: the loss (averaged over micro-batches and processes) and the
            gradient norm before clipping.
        """
        loss, grad_norm, _ = self._agree(*self._forward_backward(), stop=False)
        return loss, grad_norm

    def _forward_backward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-steps and the optimizer step, reading nothing back from the device.

        :returns: this process's mean loss and the gradient norm, as device tensors.
        """
        train = self.config.train
        acc = self.accelerator
        loss_sum = torch.zeros((), device=acc.device)
        grad_norm = torch.zeros((), device=acc.device)
        for _ in range(train.gradient_accumulation_steps):
            x, y = self._to_device(*self.sampler.next_batch())
            with acc.accumulate(self.model):
                with self.accelerator.autocast():
                    _, loss = self.model(x, y)
                loss_sum += loss.detach().float()
                acc.backward(loss)
                if acc.sync_gradients:
                    max_norm = train.grad_clip if train.grad_clip > 0 else float("inf")
                    grad_norm = acc.clip_grad_norm_(self.raw_model.parameters(), max_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / train.gradient_accumulation_steps, grad_norm

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the training device; on CUDA through pinned memory, so the copy is async."""
        device = self.accelerator.device
        if device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def _agree(
        self, loss: torch.Tensor, grad_norm: torch.Tensor, *, stop: bool
    ) -> tuple[float, float, bool]:
        """The step's figures as every process sees them, in one gather and one host read.

        The loss is averaged over processes (so the finiteness check is the same
        everywhere); a stop requested on any process stops every process after
        this step. Packing the three into one small tensor keeps the step at one
        device-to-host synchronisation.
        """
        flag = torch.ones((), device=loss.device) if stop else torch.zeros((), device=loss.device)
        packed = torch.stack([loss.float(), grad_norm.detach().float().to(loss.device), flag])
        gathered = self.accelerator.gather(packed[None, :])  # (processes, 3)
        agreed = torch.stack(
            [gathered[:, 0].mean(), gathered[:, 1].max(), gathered[:, 2].max()]
        ).tolist()
        return agreed[0], agreed[1], agreed[2] > 0

    def _throughput(self, step: int) -> dict[str, Any]:
        """Tokens per second since the last log line, over all processes.

        For fine-tuning also the response tokens per second and the share of
        padding in the batches, counted from the batches actually built.
        """
        now = time.perf_counter()
        last_time, last_step = self.throughput_mark
        self.throughput_mark = (now, step)
        seconds = max(now - last_time, 1e-9)
        if not self.fine_tuning:
            tokens = self.tokens_per_step * (step - last_step)
            return {"tokens_per_sec": tokens / seconds}
        counts = self.sampler.take_counts()
        totals = torch.tensor(
            [counts["tokens"], counts["padding"], counts["response"]],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        tokens, padding, response = self.accelerator.reduce(totals, reduction="sum").tolist()
        return {
            "tokens_per_sec": tokens / seconds,
            "response_tokens_per_sec": response / seconds,
            "padding_share": padding / max(tokens + padding, 1.0),
        }

    def _log(
        self, step: int, epoch: int, metrics: dict[str, Any], evaluate: bool
    ) -> dict[str, Any]:
        """Build this step's metrics record once; it goes to metrics.jsonl and every callback."""
        throughput = self._throughput(step)
        mfu = None
        if self.peak_flops:
            per_device = throughput["tokens_per_sec"] / self.accelerator.num_processes
            mfu = self.flops_per_token * per_device / self.peak_flops
        record: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "tokens": metrics["tokens"],
            "train_loss": metrics["train_loss"],
            "lr": metrics["lr"],
            "grad_norm": metrics["grad_norm"],
            **throughput,
            "mfu": mfu,
        }
        if evaluate:
            losses = self.estimate_loss()
            record.update(losses)
            self.echo(
                f"step {step}/{self.total_steps} (epoch {epoch}): "
                f"train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}"
            )
        record["elapsed_s"] = self.elapsed()
        self.metrics_log.append(record)
        return record

    def _step(self, bar: Any, stop: StopRequest) -> None:
        """One optimizer step, its metrics, and the callbacks that follow it."""
        train = self.train_cfg
        lr = self.set_learning_rates(self.state.step)
        loss, grad_norm, self.stop_agreed = self._agree(
            *self._forward_backward(), stop=stop.requested is not None
        )
        step = self.state.step + 1
        epoch = (step - 1) // self.steps_per_epoch + 1
        if not math.isfinite(loss):
            raise TrainingError(
                f"loss is {loss} at step {step}: training diverged; lower train.learning_rate "
                f"or check the data. Nothing was saved from this step. {self._last_good()}"
            )
        metrics = {
            **self.state.metrics,
            "train_loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.state.metrics.get("tokens", 0) + self._tokens_of_step(),
        }
        evaluate = step % train.eval_every == 0 or step == self.total_steps
        record = None
        if evaluate or step % train.log_every == 0:
            record = self._log(step, epoch, metrics, evaluate)
            metrics.update({k: v for k, v in record.items() if k not in ("step", "epoch")})
            bar.set_postfix(
                epoch=epoch, loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_sec']:,.0f}"
            )
        self._update(
            step=step,
            epoch=epoch,
            metrics=metrics,
            record=MappingProxyType(record) if record else None,
        )
        bar.update(1)
        if self.state.record is not None:
            self._call("on_metrics", self.state.record)
        self._call("on_step_end")
        if evaluate:
            self._call("on_eval_end")
        if step % self.steps_per_epoch == 0:
            self._call("on_epoch_end")
        self._end_round()

    def _tokens_of_step(self) -> int:
        """Tokens the step just taken trained on, all processes together.

        Fine-tuning counts real tokens, not padding, from the global batches
        (each process knows them all, so no communication is needed).
        """
        if self.fine_tuning:
            return self.sampler.take_global_tokens()
        return self.tokens_per_step

    def fit(self) -> dict[str, Any]:
        """Train to the end (or to a stop request) and return the last metrics.

        :raises TrainingInterrupted: SIGTERM or Ctrl-C stopped the run (exit 130).
        """
        from tqdm import tqdm

        stop = StopRequest()
        status = "failed"
        self.started = time.perf_counter()
        self.throughput_mark = (self.started, 0)
        try:
            with stop.installed():
                self.resume()
                # Before any callback may log: a line appended after a torn one would be lost.
                torn = self.metrics_log.truncate_after(self.state.step)
                if torn:
                    self.echo(
                        f"{self.paths.metrics}: dropped {torn} unreadable line(s) (a torn write)"
                    )
                self._call("on_train_start")
                self._end_round()
                self.model.train()
                bar = tqdm(
                    total=self.total_steps,
                    initial=self.state.step,
                    unit="step",
                    disable=not (self.is_main and self.progress),
                    dynamic_ncols=True,
                )
                with bar:
                    while self.state.step < self.total_steps and not self._stopping(stop):
                        self._step(bar, stop)
            status = "interrupted" if self._stopping(stop) else "completed"
        finally:
            self._finish(status)
        if status == "interrupted":
            raise TrainingInterrupted(
                self._stop_message(stop.requested or "a stop request on another process")
            )
        return dict(self.state.metrics)

    def _stopping(self, stop: StopRequest) -> bool:
        """Whether to stop before the next step.

        Under several processes, only as agreed at the last step (see
        :meth:`_agree`): a process that stopped alone would leave the others
        waiting in the next all-reduce.
        """
        if self.accelerator.num_processes == 1:
            return stop.requested is not None
        return self.stop_agreed

    def _stop_message(self, signal_name: str) -> str:
        step = self.state.step
        saved = self.state.last_saved_step
        if saved == step:
            hint = f"saved {self.paths.last_checkpoint}; run the same command to resume"
        elif saved is not None:
            hint = f"the last checkpoint is step {saved}; run the same command to resume from it"
        elif step == 0:
            hint = "nothing was trained yet"
        else:
            hint = "no checkpoint was saved (enable the checkpoint callback to resume)"
        return f"stopped by {signal_name} after step {step}: {hint}"
