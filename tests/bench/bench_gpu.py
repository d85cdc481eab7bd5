"""The GPU check: a pass/fail checklist of the CUDA paths, then GPT-2 small's speed.

    python tests/bench/bench_gpu.py [--steps 300] [--batch-size N] [--cpu-smoke]

For a session that has a GPU (never CI). What only a GPU can show is checked
here and printed as a checklist, each line PASS, FAIL or SKIP with what was seen:

- the precision ``mixed_precision = "auto"`` picks (fp16 below compute
  capability 8.0, e.g. V100; bf16 from 8.0), and TF32 allowed from 8.0;
- the attention kernel scaled_dot_product_attention actually runs (from the
  profiler's aten op: flash, memory-efficient, cuDNN or math); under fp16 on a
  V100 it must be the memory-efficient one, never math;
- host reads per optimizer step (``torch.cuda.set_sync_debug_mode``): one of
  ours, plus the GradScaler's own under fp16;
- batches copied from pinned memory (no pageable host-to-device copy of a batch);
- the fused AdamW kernel;
- a known tensor-core peak for the device, so MFU is against the right figure;
- with two or more GPUs, that each rank of ``accelerate launch`` holds a CUDA
  context on its own GPU only;
- the memory estimate ``gpt plan`` prints against the eager run's peak
  allocated memory, at the precision the device takes (fp16 on a V100, bf16
  from an A100): within 25 %.

Then tokens/s, MFU and peak memory for eager and compiled GPT-2 small runs on
random GPT-2 tokens, with a batch that fits the device (8 on a 16 GB V100).
``--cpu-smoke`` runs the same plumbing on a tiny model on the CPU (GPU-only
checks SKIP) to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchtable import print_table
from tqdm import tqdm

from nanogpt_core.config.experiment import ExperimentConfig, ModelConfig, PluginSpec, TrainConfig
from nanogpt_core.data.prepared import PreparedData
from nanogpt_core.gpus import auto_precision, capability
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.callbacks import RunPaths
from nanogpt_core.train.run import make_accelerator
from nanogpt_core.train.trainer import StopRequest, Trainer

GPT2_SMALL = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)
SMOKE = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
# The aten op behind each scaled_dot_product_attention kernel, as the profiler names it.
ATTENTION_KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
}
CHECKS: list[tuple[str, str, str]] = []


def check(name: str, ok: bool | None, seen: str) -> None:
    """Record one checklist line: ok True (PASS), False (FAIL) or None (SKIP)."""
    CHECKS.append((name, {True: "PASS", False: "FAIL", None: "SKIP"}[ok], seen))


def fake_gpt2_data(folder: Path, tokens: int) -> PreparedData:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 50257, tokens, dtype=np.uint16).tofile(folder / f"{split}.bin")
    meta = {
        "tokenizer": {"kind": "gpt2", "name": "gpt2", "vocab_size": 50257, "eot_id": 50256},
        "dtype": "uint16",
        "splits": {s: {"tokens": tokens} for s in ("train", "val")},
    }
    return PreparedData(folder, meta)


def make_trainer(
    root: Path, data: PreparedData, steps: int, batch: int, compile_: bool, smoke: bool
) -> Trainer:
    train_cfg = TrainConfig(
        batch_size=batch, steps_per_epoch=steps, warmup_steps=2, eval_every=steps,
        eval_batches=5, log_every=max(1, steps // 10), mixed_precision="auto",
        compile=compile_, device="cpu" if smoke else "cuda",
    )  # fmt: skip
    config = ExperimentConfig(
        name="gpu",
        dataset=PluginSpec(plugin="none"),
        model=SMOKE if smoke else GPT2_SMALL,
        train=train_cfg,
    )
    paths = RunPaths(root / ("compiled" if compile_ else "eager"))
    accelerator = make_accelerator(train_cfg)
    return Trainer(config, data, [], paths, accelerator, progress=False, plugins=load_plugins())


def speed(trainer: Trainer) -> dict[str, Any]:
    """Train to the end; tokens/s and MFU over the second half of the logged steps."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    lines = [json.loads(line) for line in trainer.paths.metrics.read_text().splitlines()]
    steady = lines[len(lines) // 2 :]  # past warm-up and compilation
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {
        "tokens_per_sec": sum(r["tokens_per_sec"] for r in steady) / len(steady),
        "mfu": sum(r["mfu"] or 0.0 for r in steady) / len(steady),
        "val_loss": lines[-1]["val_loss"],
        "peak_gib": peak,
    }


def syncs_per_step(trainer: Trainer, steps: int = 5) -> float:
    """Device-to-host synchronisations per optimizer step of the real loop (no log step)."""
    bar, stop = tqdm(disable=True), StopRequest()
    trainer._step(bar, stop)  # warm-up: lazy initialisation syncs once
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                trainer._step(bar, stop)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def profiled(fn: Callable[[], Any]) -> list[Any]:
    """The profiler's events (CPU ops and CUDA activity) while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return list(prof.events())


def attention_kernel(trainer: Trainer) -> str:
    """Which SDPA kernel one training micro-step ran."""
    events = profiled(trainer.train_step)
    kernels = sorted({ATTENTION_KERNELS[e.name] for e in events if e.name in ATTENTION_KERNELS})
    return ", ".join(kernels) or "none seen"


def host_to_device_copies(trainer: Trainer) -> dict[str, int]:
    """Host-to-device copies in one optimizer step, by source memory (pinned, pageable)."""
    names = [e.name for e in profiled(trainer.train_step) if "Memcpy HtoD" in e.name]
    return {
        "pinned": sum("Pinned" in name for name in names),
        "pageable": sum("Pageable" in name for name in names),
    }


def contexts_per_rank() -> tuple[bool | None, str]:
    """With 2+ GPUs: launch two ranks and list, per process, the GPUs it holds a context on."""
    if torch.cuda.device_count() < 2:
        return None, f"{torch.cuda.device_count()} GPU: needs two"
    script = Path(__file__).with_name("gpu_contexts_probe.py")
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode:
        return False, f"probe failed: {done.stderr.strip().splitlines()[-1:]}"
    held = json.loads(done.stdout.strip().splitlines()[-1])  # {pid: [gpu indices]}
    ok = all(len(gpus) == 1 for gpus in held.values()) and len(held) == 2
    return ok, f"contexts by rank: {held}"


def run_checks(trainer: Trainer, smoke: bool) -> None:
    device = trainer.accelerator.device
    cc = capability(device)
    precision = trainer.accelerator.mixed_precision
    want = "no" if smoke else ("bf16" if cc >= (8, 0) else "fp16")
    check("auto precision", precision == want == auto_precision(device), f"{precision} at {cc}")
    if smoke:
        check("TF32 from compute capability 8.0", None, "no CUDA")
    else:
        tf32 = torch.backends.cuda.matmul.fp32_precision == "tf32"
        check("TF32 from compute capability 8.0", tf32 == (cc >= (8, 0)), f"matmul tf32: {tf32}")
    kernel = attention_kernel(trainer)
    if smoke:
        check("attention kernel", None, f"{kernel} on the CPU")
    else:
        expected = {"memory-efficient"} if cc < (8, 0) else {"flash", "cuDNN"}
        check("attention kernel", kernel in expected, kernel)
    if smoke:
        check("host reads per step", None, "no CUDA")
        check("batches from pinned memory", None, "no CUDA")
    else:
        allowed = 2 if precision == "fp16" else 1  # fp16: the GradScaler's own skip check
        syncs = syncs_per_step(trainer)
        check("host reads per step", syncs <= allowed, f"{syncs:.1f} (at most {allowed})")
        copies = host_to_device_copies(trainer)
        # Each micro-step copies its inputs and targets: both must come from pinned memory.
        wanted = 2 * trainer.train_cfg.gradient_accumulation_steps
        check("batches from pinned memory", copies["pinned"] >= wanted, f"HtoD copies {copies}")
    fused = trainer.optimizer.optimizer.defaults.get("fused")
    check("fused AdamW", None if smoke else bool(fused), f"fused={fused}")
    name = torch.cuda.get_device_name(device) if not smoke else "cpu"
    check("known peak FLOPs (MFU)", None if smoke else trainer.peak_flops is not None,
          f"{name}: {trainer.peak_flops}")  # fmt: skip
    if smoke:
        check("one CUDA context per rank", None, "no CUDA")
    else:
        check("one CUDA context per rank", *contexts_per_rank())


def estimated_bytes(trainer: Trainer) -> int:
    """The project's one memory estimate (what ``gpt plan`` prints) for this trainer's run."""
    from nanogpt_core.train.memory import estimate_training_memory, optimizer_state_bytes
    from nanogpt_core.train.optimization import make_optimizer

    shape = trainer.raw_model.config
    optimizer = optimizer_state_bytes(
        shape, lambda model: make_optimizer(trainer.plugins, trainer.train_cfg, model, "meta")
    )
    return estimate_training_memory(
        shape,
        batch_size=trainer.train_cfg.batch_size,
        precision=trainer.accelerator.mixed_precision,
        optimizer_bytes=optimizer,
    ).total


def check_estimate(estimate: int, peak_gib: float, precision: str, smoke: bool) -> None:
    """The estimate against the eager run's peak allocated memory: within 25 %."""
    name = f"memory estimate vs peak ({precision})"
    if smoke:
        check(name, None, f"estimate {estimate / 2**30:.2f} GiB; no CUDA allocator on the CPU")
        return
    ratio = estimate / 2**30 / peak_gib
    check(
        name,
        0.75 <= ratio <= 1.25,
        f"{estimate / 2**30:.2f} GiB vs {peak_gib:.2f} GiB: {ratio:.2f}x",
    )


def default_batch() -> int:
    """A GPT-2 small batch (T = 1024) that fits the device: 8 on a 16 GB V100."""
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    return 32 if total >= 70 else 16 if total >= 30 else 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if smoke:
        args.steps, batch = 4, args.batch_size or 4
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs only on a GPU machine (or use --cpu-smoke)")
    else:
        batch = args.batch_size or default_batch()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = fake_gpt2_data(root, 200_000 if smoke else 20_000_000)
        checked = make_trainer(root / "checks", data, args.steps, batch, False, smoke)
        run_checks(checked, smoke)
        del checked
        eager_trainer = make_trainer(root, data, args.steps, batch, False, smoke)
        estimate = estimated_bytes(eager_trainer)
        eager = speed(eager_trainer)
        precision = eager_trainer.accelerator.mixed_precision
        check_estimate(estimate, eager["peak_gib"], precision, smoke)
        del eager_trainer
        compiled = speed(make_trainer(root, data, args.steps, batch, True, smoke))
    name = torch.cuda.get_device_name() if not smoke else "cpu"
    block = (SMOKE if smoke else GPT2_SMALL).block_size
    print(f"device: {name}, torch {torch.__version__}, batch {batch} x {block}")
    width = max(len(c[0]) for c in CHECKS)
    for what, verdict, seen in CHECKS:
        print(f"{verdict}  {what.ljust(width)}  {seen}")
    print(f"final val loss eager {eager['val_loss']:.3f}, compiled {compiled['val_loss']:.3f}")
    ratio = compiled["tokens_per_sec"] / eager["tokens_per_sec"]
    print_table(
        [
            ("GPT-2 small tokens/s, compile vs eager", f"{compiled['tokens_per_sec']:,.0f}",
             f"{eager['tokens_per_sec']:,.0f}", f"{ratio:.2f}x", ">= 1.30x"),
            (f"MFU on {name}, compile vs eager", f"{compiled['mfu']:.1%}", f"{eager['mfu']:.1%}",
             "-", "informational"),
            ("peak GiB allocated, compile vs eager", f"{compiled['peak_gib']:.1f}",
             f"{eager['peak_gib']:.1f}", "-", "fits the device"),
        ]
    )  # fmt: skip
    sys.exit(1 if any(verdict == "FAIL" for _, verdict, _ in CHECKS) else 0)


if __name__ == "__main__":
    main()
