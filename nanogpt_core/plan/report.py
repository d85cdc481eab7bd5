"""A plan in words: the table ``gpt plan`` prints, its JSON and ``gpt run``'s one line.

Token counts are decimal (``9.8B tokens``), bytes binary (``14.2 GiB``), as
the field writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from nanogpt_core.plan.figures import RunPlan
from nanogpt_core.plan.hardware import describe
from nanogpt_core.train.memory import human_bytes


def count(n: float) -> str:
    """``124.4M``, ``9.83B``, ``812`` ."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def passes_text(passes: float) -> str:
    """``0.36``, ``2.6``, ``106``."""
    return f"{passes:.2g}" if passes < 10 else f"{passes:.0f}"


def duration(seconds: float) -> str:
    """``42 s``, ``17 min``, ``5.3 h``, ``3.2 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _model_lines(plan: RunPlan) -> list[str]:
    model = plan.model
    return [
        f"{count(model.parameters)} parameters ({count(model.embedding)} embedding, "
        f"{count(model.non_embedding)} non-embedding), vocabulary {model.vocab_size:,}",
        f"{model.flops_per_token / 1e9:.3g} GFLOP per token trained (6N plus attention, "
        "as MFU counts them)",
    ]


def _data_lines(plan: RunPlan) -> list[str]:
    data = plan.data
    lines = []
    if data.tokens_per_step is None:
        lines.append(f"{data.steps:,} steps; tokens per step unknown until the data is prepared")
    else:
        per_step = "about " if data.fine_tuning else ""
        lines.append(
            f"{per_step}{count(data.tokens_per_step)} tokens per step x {data.steps:,} steps "
            f"= {count(data.training_tokens or 0)} training tokens"
        )
    if data.train_tokens is None:
        lines.append("unique tokens unknown (not prepared, and the dataset gives no estimate)")
    else:
        how = "counted in meta.json" if data.source == "prepared" else "the dataset's estimate"
        passes = f", {passes_text(data.passes)} passes" if data.passes is not None else ""
        val = f"; val {count(data.val_tokens)}" if data.val_tokens is not None else ""
        lines.append(f"{count(data.train_tokens)} unique train tokens ({how}){passes}{val}")
    return lines


def _memory_lines(plan: RunPlan) -> list[str]:
    memory = plan.memory
    estimate = memory.estimate
    optimizer = "measured" if memory.optimizer_measured else "AdamW's assumed"
    precision = {"no": "float32"}.get(memory.precision, memory.precision)
    if memory.parallelism == "fsdp":
        sharing = f"fsdp: weights, gradients and optimizer state in {memory.shards} shards"
    else:
        sharing = "ddp: every process holds the whole model, gradients and optimizer state"
    lines = [
        sharing,
        f"per process: weights {human_bytes(estimate.weights)}, gradients "
        f"{human_bytes(estimate.gradients)}, optimizer {human_bytes(estimate.optimizer)} "
        f"({optimizer}), activations {human_bytes(estimate.activations)} ({precision})",
    ]
    total = f"total {human_bytes(estimate.total)}"
    if memory.device_memory is None:
        lines.append(f"{total}; the device's memory is unknown")
    else:
        reserve = f", {human_bytes(memory.reserve)} kept for CUDA" if memory.reserve else ""
        verdict = "fits" if memory.fits else "DOES NOT FIT"
        lines.append(
            f"{total} of {human_bytes(memory.device_memory)} ({plan.hardware.name}{reserve}): {verdict}"
        )
    return lines


def _time_lines(plan: RunPlan) -> list[str]:
    time = plan.time
    if time.seconds is None:
        why = (
            "no tensor-core peak for this device and precision; name a GPU with --gpus "
            "or set train.peak_flops"
            if time.peak is None
            else "no MFU to assume; pass --mfu"
            if time.mfu is None
            else "the training tokens are unknown"
        )
        lines = [f"not estimated: {why}"]
    else:
        lines = [
            f"about {duration(time.seconds)} at {time.mfu:.0%} MFU ({time.mfu_source}) of "
            f"{time.peak / 1e12:.0f} TFLOP/s per device"
        ]
    if time.allreduce_seconds is not None:
        step = (
            f" ({time.allreduce_seconds / (time.seconds / plan.data.steps):.0%} of a step's compute; "
            "DDP overlaps it with the backward pass)"
            if time.seconds
            else ""
        )
        lines.append(
            f"gradient all-reduce over {time.interconnect}: {time.allreduce_seconds * 1000:.3g} ms "
            f"per step{step}"
        )
    return lines


def _disk_lines(plan: RunPlan) -> list[str]:
    disk = plan.disk
    if disk.data_bytes is None:
        data = "data size unknown"
    else:
        how = "prepared" if disk.data_prepared else "estimated, not prepared yet"
        data = f"data {human_bytes(disk.data_bytes)} ({how})"
    lines = [
        f"{data} in {disk.data_folder}",
        f"checkpoints {human_bytes(disk.checkpoint_bytes)} each x {disk.checkpoints_kept} kept "
        f"= {human_bytes(disk.checkpoints_bytes)} in {disk.results_folder}",
    ]
    free = [
        f"{human_bytes(free)} free for the {what}"
        for what, free in (("data", disk.data_free), ("results", disk.results_free))
        if free is not None
    ]
    if disk.same_filesystem and disk.data_free is not None:
        free = [f"{human_bytes(disk.data_free)} free for both (one file system)"]
    if free:
        lines.append("; ".join(free))
    return lines


def plan_table(plan: RunPlan) -> str:
    """The table ``gpt plan`` prints: a section per line group, then the warnings."""
    precision = {"no": "float32"}.get(plan.memory.precision, plan.memory.precision)
    out = [f"plan for {plan.experiment} on {describe(plan.hardware)} ({precision})"]
    for title, lines in (
        ("model", _model_lines(plan)),
        ("data", _data_lines(plan)),
        ("memory", _memory_lines(plan)),
        ("time", _time_lines(plan)),
        ("disk", _disk_lines(plan)),
    ):
        out += [f"  {title if i == 0 else '':<8}{line}" for i, line in enumerate(lines)]
    out += [f"warning: {warning}" for warning in plan.warnings()]
    return "\n".join(out)


def plan_json(plan: RunPlan) -> dict[str, Any]:
    """The plan as JSON-able data: every figure, what follows from them, and the warnings."""

    def value(_inst: Any, _field: Any, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    out = attrs.asdict(plan, value_serializer=value)
    out["model"]["non_embedding"] = plan.model.non_embedding
    out["data"].update(training_tokens=plan.data.training_tokens, passes=plan.data.passes)
    out["memory"]["estimate"]["total"] = plan.memory.estimate.total
    out["memory"]["fits"] = plan.memory.fits
    out["disk"]["checkpoints_bytes"] = plan.disk.checkpoints_bytes
    out["warnings"] = plan.warnings()
    return out


def plan_summary(plan: RunPlan) -> str:
    """``gpt run``'s one line: size, tokens and passes, memory per process, time."""
    data = plan.data
    parts = [f"{count(plan.model.parameters)} parameters"]
    if data.training_tokens is not None:
        tokens = f"{data.steps:,} steps, {count(data.training_tokens)} tokens"
        if data.passes is not None:
            tokens += f" ({passes_text(data.passes)} passes over {count(data.train_tokens or 0)})"
        parts.append(tokens)
    sharded = f" ({plan.memory.shards} fsdp shards)" if plan.memory.shards > 1 else ""
    parts.append(f"about {human_bytes(plan.memory.estimate.total)} per process{sharded}")
    if plan.time.seconds is not None:
        parts.append(f"about {duration(plan.time.seconds)} at {plan.time.mfu:.0%} MFU")
    return "plan: " + ", ".join(parts)
