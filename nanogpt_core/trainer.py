"""The training loop: nanoGPT's recipe, driven by Hugging Face Accelerate.

The same code runs on one CPU, one GPU, or many processes under
``accelerate launch``: Accelerate owns devices, mixed precision, gradient
accumulation and the gradient all-reduce; this module owns the recipe (AdamW,
warmup and cosine decay, clipping, evaluation), the metrics, and the moments at
which callbacks are called. Only the main process writes files or prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from nanogpt_core import __version__
from nanogpt_core.callbacks import CALLBACK_HOOKS, Callback, RunPaths, TrainerState
from nanogpt_core.config import ExperimentConfig, TrainConfig
from nanogpt_core.datasets import PreparedData
from nanogpt_core.errors import NanoGPTError, TrainingError
from nanogpt_core.files import atomic_write_text
from nanogpt_core.model import GPT, GPTConfig
from nanogpt_core.sampler import BatchSource, MemmapSampler

# Dense bf16/fp16 tensor-core peaks per device, in FLOP/s, from NVIDIA's data sheets.
# Matched against torch.cuda.get_device_name(); unknown hardware gets no MFU
# rather than another chip's figure.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("V100", 125e12),
)
# Seeds offsets: evaluation draws fixed batches that never touch the training stream.
EVAL_SEED_OFFSET = 1_000_003


class TrainingInterrupted(NanoGPTError):
    """SIGTERM or Ctrl-C stopped the run after a clean save: exit status 130."""

    exit_code = 130


def peak_flops(device_name: str, mixed_precision: str) -> float | None:
    """The known tensor-core peak for ``device_name`` at half precision, else None."""
    if mixed_precision not in ("bf16", "fp16"):
        return None
    if mixed_precision == "bf16" and "V100" in device_name:
        return None
    for fragment, flops in PEAK_FLOPS:
        if fragment in device_name:
            return flops
    return None


def learning_rate_at(step: int, train: TrainConfig, total_steps: int) -> float:
    """Linear warmup to ``learning_rate``, then cosine decay to ``min_lr`` at the last step.

    :param step: the 0-based index of the optimizer step about to be taken.
    """
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / (train.warmup_steps + 1)
    decay_steps = max(1, total_steps - 1 - train.warmup_steps)
    ratio = min(1.0, (step - train.warmup_steps) / decay_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return train.min_lr + coeff * (train.learning_rate - train.min_lr)


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
    return GPTConfig(
        block_size=model.block_size,
        vocab_size=vocab_size,
        n_layer=model.n_layer,
        n_head=model.n_head,
        n_embd=model.n_embd,
        dropout=model.dropout,
        bias=model.bias,
    )


class MetricsLog:
    """``metrics.jsonl``: one JSON line per logged step, appended as training goes."""

    def __init__(self, path: Any, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop lines after ``step`` (a resume rewrites them), atomically."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        """Append one line and flush it."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def rng_state() -> dict[str, Any]:
    """This process's random states, as tensors and plain containers only."""
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
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """Trains a GPT on prepared data and calls the experiment's callbacks.

    :param config: the resolved experiment.
    :param data: the prepared dataset.
    :param callbacks: the enabled callbacks, in the experiment's order.
    :param paths: the run's results folder.
    :param accelerator: an ``accelerate.Accelerator`` built for ``config.train``.
    :param progress: show a progress bar on the main process.
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
    ) -> None:
        self.config = config
        self.data = data
        self.callbacks = callbacks
        self.paths = paths
        self.accelerator = accelerator
        self.progress = progress
        self.train_cfg = config.train
        self.total_steps = self.train_cfg.epochs * self.train_cfg.steps_per_epoch
        self.is_main = accelerator.is_main_process
        self.metrics_log = MetricsLog(paths.metrics, enabled=self.is_main)
        self.elapsed_before = 0.0

    # -- output --------------------------------------------------------------

    def echo(self, message: str) -> None:
        """Print a line on the main process without breaking the progress bar."""
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(message)

    # -- set-up --------------------------------------------------------------

    def build(self) -> None:
        """Create the model, optimizer and samplers, and hand them to Accelerate."""
        from accelerate.utils import set_seed

        acc = self.accelerator
        # Same seed on every rank: identical initial weights everywhere.
        set_seed(self.config.seed)
        self.model_config = model_config_for(self.config, self.data)
        self.raw_model = GPT(self.model_config)
        if self.config.model.init_from:
            self._init_from(self.config.model.init_from)
        total = self.raw_model.num_params()
        non_embedding = self.raw_model.num_params(non_embedding=True)
        self.echo(
            f"model: {total / 1e6:.2f}M parameters ({non_embedding / 1e6:.2f}M non-embedding)"
        )
        self.raw_model.to(acc.device)
        optimizer = self.raw_model.configure_optimizers(
            self.train_cfg.weight_decay,
            self.train_cfg.learning_rate,
            (self.train_cfg.beta1, self.train_cfg.beta2),
            acc.device.type,
        )
        model: torch.nn.Module = self.raw_model
        if self.train_cfg.compile:
            model = torch.compile(model)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        train = self.config.train
        self.sampler: BatchSource = MemmapSampler(
            self.data.split_path("train"),
            self.data.dtype,
            self.model_config.block_size,
            train.batch_size,
            seed=self.config.seed + acc.process_index,
            vocab_size=self.model_config.vocab_size,
        )
        # Check val once here; evaluation builds fresh val samplers with fixed seeds.
        MemmapSampler(
            self.data.split_path("val"),
            self.data.dtype,
            self.model_config.block_size,
            train.batch_size,
            seed=0,
            vocab_size=self.model_config.vocab_size,
        )
        name = torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else "cpu"
        self.peak_flops = train.peak_flops or peak_flops(name, train.mixed_precision)
        self.flops_per_token = self.raw_model.flops_per_token()
        self.state = TrainerState(
            config=self.config,
            paths=self.paths,
            step=0,
            epoch=1,
            total_steps=self.total_steps,
            model=self.raw_model,
            optimizer=self.optimizer,
            accelerator=acc,
            tokenizer=self.data.tokenizer,
            is_main_process=self.is_main,
            snapshot=self.snapshot,
            restore=self.restore,
        )

    def _init_from(self, folder: str) -> None:
        from nanogpt_core.hf_gpt2 import config_from_hf, from_hf_state_dict, read_hf_folder

        hf_config, state = read_hf_folder(folder)
        theirs = config_from_hf(hf_config)
        differences = [
            f"model.{key} = {getattr(self.model_config, key)} but {folder} has {getattr(theirs, key)}"
            for key in ("n_layer", "n_head", "n_embd", "bias")
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
        from_hf_state_dict(self.raw_model, state)

    # -- checkpoint contents (used by the checkpoint callback) ---------------

    def snapshot(self) -> dict[str, Any]:
        """Everything a resumed run needs, gathered from every process.

        Call it on every process (it communicates); only tensors and plain
        containers, so ``torch.load(weights_only=True)`` reads it back.
        """
        from accelerate.utils import gather_object

        per_rank = {"sampler": self.sampler.state_dict(), "rng": rng_state()}
        ranks = gather_object([per_rank]) if self.accelerator.num_processes > 1 else [per_rank]
        return {
            "version": __version__,
            "model_args": asdict(self.model_config),
            "model": {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "elapsed_s": self.elapsed(),
            "ranks": ranks,
            "callbacks": {
                spec.plugin: callback.state_dict()
                for spec, callback in zip(self.config.callbacks, self.callbacks, strict=True)
            },
            "config": self.config.to_dict(),
            "tokenizer": self.data.tokenizer,
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a :meth:`snapshot`; refuse one whose model shape differs."""
        saved = checkpoint["model_args"]
        current = asdict(self.model_config)
        differences = [
            f"{key} {saved.get(key)} in the checkpoint, {current[key]} in the experiment"
            for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
            if saved.get(key) != current[key]
        ]
        if differences:
            raise NanoGPTError(
                "the checkpoint's model differs from the experiment's: " + "; ".join(differences)
            )
        self.raw_model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.accelerator.scaler and checkpoint.get("scaler"):
            self.accelerator.scaler.load_state_dict(checkpoint["scaler"])
        self.state.step = int(checkpoint["step"])
        self.state.epoch = int(checkpoint["epoch"])
        self.elapsed_before = float(checkpoint.get("elapsed_s", 0.0))
        ranks = checkpoint["ranks"]
        rank = self.accelerator.process_index
        if rank < len(ranks):
            self.sampler.load_state_dict(ranks[rank]["sampler"])
            set_rng_state(ranks[rank]["rng"])
        for spec, callback in zip(self.config.callbacks, self.callbacks, strict=True):
            if spec.plugin in checkpoint["callbacks"]:
                callback.load_state_dict(checkpoint["callbacks"][spec.plugin])

    # -- the loop ------------------------------------------------------------

    def call(self, hook: str) -> None:
        """Call ``hook`` on every enabled callback, in the experiment's order."""
        assert hook in CALLBACK_HOOKS
        for callback in self.callbacks:
            getattr(callback, hook)(self.state)

    def elapsed(self) -> float:
        """Seconds of training so far, across resumes."""
        return self.elapsed_before + (time.perf_counter() - self.started)

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over ``eval_batches`` fixed batches of each split, averaged over processes."""
        train = self.config.train
        out: dict[str, float] = {}
        self.model.eval()
        for split in ("train", "val"):
            sampler = MemmapSampler(
                self.data.split_path(split),
                self.data.dtype,
                self.model_config.block_size,
                train.batch_size,
                seed=self.config.seed + EVAL_SEED_OFFSET + self.accelerator.process_index,
            )
            losses = torch.zeros(train.eval_batches, device=self.accelerator.device)
            for k in range(train.eval_batches):
                x, y = (t.to(self.accelerator.device) for t in sampler.next_batch())
                with self.accelerator.autocast():
                    _, loss = self.model(x, y)
                losses[k] = loss.float()
            out[f"{split}_loss"] = self.accelerator.reduce(losses.mean(), reduction="mean").item()
        self.model.train()
        return out

    def train_step(self, lr: float) -> tuple[float, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        train = self.config.train
        acc = self.accelerator
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=acc.device)
        grad_norm = torch.zeros((), device=acc.device)
        for _ in range(train.gradient_accumulation_steps):
            x, y = self.sampler.next_batch()
            x = x.to(acc.device, non_blocking=True)
            y = y.to(acc.device, non_blocking=True)
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
        mean_loss = acc.reduce(loss_sum / train.gradient_accumulation_steps, reduction="mean")
        return mean_loss.item(), float(grad_norm)

    def fit(self) -> dict[str, float]:
        """Train to the end (or to a stop request) and return the last metrics."""
        from tqdm import tqdm

        self.build()
        self.started = time.perf_counter()
        stop = StopRequest()
        state = self.state
        status = "failed"
        try:
            self.call("on_train_start")
            self.metrics_log.truncate_after(state.step)
            self.model.train()
            train = self.config.train
            tokens_per_step = (
                train.batch_size
                * self.model_config.block_size
                * train.gradient_accumulation_steps
                * self.accelerator.num_processes
            )
            bar = tqdm(
                total=self.total_steps,
                initial=state.step,
                unit="step",
                disable=not (self.is_main and self.progress),
                dynamic_ncols=True,
            )
            last_time, last_step = time.perf_counter(), state.step
            with bar, stop.installed():
                while state.step < self.total_steps and not stop.requested:
                    lr = learning_rate_at(state.step, train, self.total_steps)
                    loss, grad_norm = self.train_step(lr)
                    state.step += 1
                    state.epoch = (state.step - 1) // train.steps_per_epoch + 1
                    if not math.isfinite(loss):
                        raise TrainingError(
                            f"loss is {loss} at step {state.step}: training diverged; lower "
                            "train.learning_rate or check the data (nothing was saved from this step)"
                        )
                    state.metrics.update({"train_loss": loss, "lr": lr, "grad_norm": grad_norm})
                    state.record = None
                    evaluate = state.step % train.eval_every == 0 or state.step == self.total_steps
                    if evaluate or state.step % train.log_every == 0:
                        now = time.perf_counter()
                        tokens_per_sec = (
                            tokens_per_step * (state.step - last_step) / (now - last_time)
                        )
                        last_time, last_step = now, state.step
                        mfu = None
                        if self.peak_flops:
                            per_device = tokens_per_sec / self.accelerator.num_processes
                            mfu = self.flops_per_token * per_device / self.peak_flops
                        state.metrics.update({"tokens_per_sec": tokens_per_sec, "mfu": mfu})
                        record: dict[str, Any] = {
                            "step": state.step,
                            "epoch": state.epoch,
                            "train_loss": loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens_per_sec": tokens_per_sec,
                            "mfu": mfu,
                        }
                        if evaluate:
                            losses = self.estimate_loss()
                            state.metrics.update(losses)
                            record.update(losses)
                            self.echo(
                                f"step {state.step}/{self.total_steps} (epoch {state.epoch}): "
                                f"train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}"
                            )
                        record["elapsed_s"] = self.elapsed()
                        self.metrics_log.append(record)
                        state.record = record
                        bar.set_postfix(
                            epoch=state.epoch, loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}"
                        )
                    bar.update(1)
                    self.call("on_step_end")
                    if evaluate:
                        self.call("on_eval_end")
                    if state.step % train.steps_per_epoch == 0:
                        self.call("on_epoch_end")
            status = "interrupted" if stop.requested else "completed"
        finally:
            state.status = status
            self.call("on_train_end")
        if stop.requested:
            raise TrainingInterrupted(
                f"stopped by {stop.requested} after step {state.step}; run the same command to resume"
            )
        return dict(state.metrics)
