"""How fast a run trains: its clock, tokens per second and model FLOPs utilisation.

Tokens per second are measured between two lines of ``metrics.jsonl``, over all
processes together. Pre-training steps all train on the same number of tokens;
fine-tuning batches are padded examples, so they are counted from the batches
actually built (real tokens, response tokens and padding). MFU compares the
model's FLOPs per token at that rate with the device's tensor-core peak.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from nanogpt_core.gpus import capability, peak_flops

if TYPE_CHECKING:
    from nanogpt_core.config.experiment import TrainConfig
    from nanogpt_core.model.gpt import GPT


def device_peak_flops(device: torch.device, mixed_precision: str) -> float | None:
    """The tensor-core peak of this process's ``device`` (None on the CPU or unknown GPUs)."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), mixed_precision, capability(device))


class Throughput:
    """The run's training seconds (across resumes), tokens counted, tokens/s and MFU.

    :param accelerator: the run's ``accelerate.Accelerator`` (to sum counts over processes).
    :param sampler: the training batches (fine-tuning batches count their tokens).
    :param fine_tuning: whether the batches are padded examples.
    :param tokens_per_step: tokens of one pre-training step, all processes together.
    :param flops_per_token: the model's training FLOPs per token.
    :param peak_flops: one device's peak FLOPs, or None (no MFU).
    """

    def __init__(
        self,
        accelerator: Any,
        sampler: Any,
        *,
        fine_tuning: bool,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops: float | None,
    ) -> None:
        self.accelerator = accelerator
        self.sampler = sampler
        self.fine_tuning = fine_tuning
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.elapsed_before = 0.0
        self.started = time.perf_counter()
        # When and at which step the last metrics line was measured.
        self.mark = (self.started, 0)

    @classmethod
    def for_run(
        cls, train: TrainConfig, model: GPT, accelerator: Any, sampler: Any, *, fine_tuning: bool
    ) -> Throughput:
        """The accounting of a run of ``train`` on ``model`` (its peak: the experiment's or the device's)."""
        # Pre-training steps all train on the same tokens, all processes together.
        tokens_per_step = (
            train.batch_size
            * model.config.block_size
            * train.gradient_accumulation_steps
            * accelerator.num_processes
        )
        return cls(
            accelerator,
            sampler,
            fine_tuning=fine_tuning,
            tokens_per_step=tokens_per_step,
            flops_per_token=model.flops_per_token(),
            peak_flops=train.peak_flops
            or device_peak_flops(accelerator.device, accelerator.mixed_precision),
        )

    def start(self) -> None:
        """Start the clock (and the first tokens/s measurement) now, at step 0."""
        self.started = time.perf_counter()
        self.mark = (self.started, 0)

    def resume(self, step: int, elapsed_s: float) -> None:
        """Continue a run that trained ``elapsed_s`` seconds up to ``step``."""
        self.elapsed_before = elapsed_s
        self.mark = (time.perf_counter(), step)

    def elapsed(self) -> float:
        """Seconds of training so far, across resumes."""
        return self.elapsed_before + (time.perf_counter() - self.started)

    def tokens_of_step(self) -> int:
        """Tokens the step just taken trained on, all processes together.

        Fine-tuning counts real tokens, not padding, from the global batches
        (each process knows them all, so no communication is needed).
        """
        if self.fine_tuning:
            return self.sampler.take_global_tokens()
        return self.tokens_per_step

    def since_last_log(self, step: int) -> dict[str, Any]:
        """Tokens per second since the last log line, over all processes, and MFU.

        For fine-tuning also the response tokens per second and the share of
        padding in the batches, counted from the batches actually built. Every
        process must call it (fine-tuning counts are summed over processes).
        """
        throughput = self._rates(step)
        mfu = None
        if self.peak_flops:
            per_device = throughput["tokens_per_sec"] / self.accelerator.num_processes
            mfu = self.flops_per_token * per_device / self.peak_flops
        return {**throughput, "mfu": mfu}

    def _rates(self, step: int) -> dict[str, Any]:
        now = time.perf_counter()
        last_time, last_step = self.mark
        self.mark = (now, step)
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
