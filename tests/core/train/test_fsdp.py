"""``[train] parallelism = "fsdp"``: FSDP2 on two CPU processes (gloo) against DDP.

The slow tests share one set of runs (a module fixture): the same tiny
experiment under DDP and under FSDP, an FSDP run killed after a checkpoint and
relaunched, and resumes at another process count.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanogpt_core.config.experiment import TrainConfig
from nanogpt_core.train.checkpoints import load_checkpoint

# 50 steps of two micro-batches, clipped hard enough that clipping acts.
EXPERIMENT = """
name = "{name}"
seed = 1337

[dataset]
plugin = "shakespeare"
path = "{path}"

[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32

[train]
batch_size = 4
gradient_accumulation_steps = 2
grad_clip = 0.5
epochs = 2
steps_per_epoch = 25
learning_rate = 3e-3
min_lr = 3e-4
warmup_steps = 5
eval_every = 25
eval_batches = 2
log_every = 5
save_every = 10
beta2 = 0.99

[[callbacks]]
plugin = "checkpoint"
keep_last = 1

# Each forward of a sharded model needs every process: three batches over two
# processes, and a prompt completed on the main process only under DDP.
[[callbacks]]
plugin = "eval"
tasks = ["val_loss"]
every_epochs = 1

[eval.val_loss]
batches = 3

[[callbacks]]
plugin = "fixed_prompts"
prompts = ["ROMEO:"]
max_new_tokens = 16
"""


def test_parallelism_defaults_to_ddp_and_accepts_fsdp():
    assert TrainConfig().parallelism == "ddp"
    assert TrainConfig(parallelism="fsdp").parallelism == "fsdp"


def test_a_bad_parallelism_is_one_line_naming_the_choices(tiny_char_experiment, tmp_path):
    path = tiny_char_experiment(extra="")
    done = subprocess.run(
        [sys.executable, "-m", "nanogpt_core", "run", str(path), "--dry-run",
         "--set", "train.parallelism=zero3"],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "train.parallelism" in lines[0] and "'ddp', 'fsdp'" in lines[0].replace('"', "'")
    assert "zero3" in lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(experiment: Path, results: Path, data: Path, *sets: str, processes: int = 2):
    """``gpt run`` of ``experiment``: under ``accelerate launch`` on two CPU processes, or plain."""
    args = ["run", str(experiment), "--results-dir", str(results), "--data-dir", str(data)]
    args += [part for s in sets for part in ("--set", s)]
    if processes == 1:
        return [sys.executable, "-m", "nanogpt_core", *args]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [
        accelerate, "launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "nanogpt_core", *args,
    ]  # fmt: skip


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def kill_when_saving(cmd: list[str], checkpoint: Path, step: int) -> None:
    """Start ``cmd``; SIGKILL its ranks and launcher once the shards of ``step`` are in place.

    That is while (or just after) the main process writes the ``.pth`` naming
    them: the moment the previous checkpoint must survive. Only the folder's
    name is polled (reading a checkpoint takes long against a tiny model's steps).
    """
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    folder = checkpoint.with_name(f"{checkpoint.name}.shards-{step:06d}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not folder.is_dir():
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    # The ranks first (torchrun starts them in sessions of their own), then the launcher.
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait(timeout=60)
    assert not checkpoint.parent.with_name("done").exists(), "killed too late: it finished"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The module's runs, by name: folders under one results directory."""
    from conftest import SHARED_DATA as shared_data

    if not shared_data.is_dir():
        pytest.skip(f"real data samples not found at {shared_data}")
    root = tmp_path_factory.mktemp("fsdp")
    data, results = root / "data", root / "results"
    experiment = root / "exp.toml"
    text = EXPERIMENT.format(name="{name}", path=shared_data / "tinyshakespeare" / "input.txt")
    experiment.write_text(text.replace('name = "{name}"', 'name = "ddp"'))
    fsdp = "train.parallelism=fsdp"
    out = {"root": root, "experiment": experiment, "data": data, "results": results}
    out["ddp_stdout"] = run(command(experiment, results, data)).stdout
    out["fsdp_stdout"] = run(command(experiment, results, data, fsdp, "name=fsdp")).stdout
    # Killed while it saves step 20 (epoch 1 ends at 25), relaunched.
    killed = [fsdp, "name=killed", "train.steps_per_epoch=25"]
    last = results / "killed/checkpoints/last.pth"
    kill_when_saving(command(experiment, results, data, *killed), last, 20)
    out["killed_files"] = sorted(p.name for p in last.parent.iterdir())
    out["killed_step"] = load_checkpoint(last, resume=True)["step"]  # intact: 10 or 20
    moved = out["moved"] = root / "moved"  # the same run, resumed at other process counts
    shutil.copytree(results / "killed", moved / "killed")
    out["resumed_stdout"] = run(command(experiment, results, data, *killed)).stdout
    # The killed run's checkpoint continued by one process (2 -> 1), then by two (1 -> 2).
    out["one_stdout"] = run(command(experiment, moved, data, *killed, processes=1)).stdout
    out["two_stdout"] = run(command(experiment, moved, data, *killed, "train.epochs=3")).stdout
    return out


@pytest.mark.slow
def test_fsdp_reaches_the_losses_of_ddp(runs):
    ddp, fsdp = figures(runs["results"] / "ddp"), figures(runs["results"] / "fsdp")
    assert [m["step"] for m in fsdp if "lr" in m] == list(range(5, 51, 5))
    assert [m["step"] for m in fsdp if "lr" not in m] == [25, 50]  # the eval callback's
    assert_same_figures(ddp, fsdp)
    samples = [runs["results"] / name / "samples" / "epoch_0002.txt" for name in ("ddp", "fsdp")]
    assert samples[1].read_text() == samples[0].read_text()
    # The clip acted (a norm above 0.5) and the sharded norm is the whole model's.
    assert max(m["grad_norm"] for m in fsdp if "lr" in m) > 0.5
    assert fsdp[-1]["tokens"] == 50 * 2 * 4 * 32 * 2


@pytest.mark.slow
def test_fsdp_checkpoints_are_a_pth_and_its_shard_folder(runs):
    import torch

    from nanogpt_core.train.shard_files import folder_checksum

    folder = runs["results"] / "fsdp" / "checkpoints"
    # keep_last = 1: the pruned epoch file's folder went with it; one folder per file.
    assert sorted(p.name for p in folder.iterdir()) == [
        "ckpt_epoch_2.pth",
        "ckpt_epoch_2.pth.shards-000050",
        "last.pth",
        "last.pth.shards-000050",
    ]
    last = load_checkpoint(folder / "last.pth", resume=True)
    assert "exp_avg" in last["optimizer"]["state"][0]  # the plain part; the tensors are shards
    assert not any(isinstance(v, torch.Tensor) for v in last["optimizer"]["state"][0].values())
    assert last["shards"]["folder"] == "last.pth.shards-000050"
    assert last["shards"]["processes"] == 2
    assert last["shards"]["checksum"] == folder_checksum(folder / "last.pth.shards-000050")
    ddp = load_checkpoint(runs["results"] / "ddp" / "checkpoints" / "last.pth", resume=True)
    assert set(last["model"]) == set(ddp["model"])  # whole weights, as DDP saves them
    for name, tensor in ddp["model"].items():
        assert last["model"][name].shape == tensor.shape
        assert (last["model"][name] - tensor).abs().max() < 1e-5, name


@pytest.mark.slow
def test_sharded_optimizer_state_loads_whole_in_one_process_equal_to_ddps(runs):
    """2 -> 1: the two processes' shards read back by one process are DDP's whole state."""
    import torch

    from nanogpt_core.model.config import GPTConfig
    from nanogpt_core.model.gpt import GPT
    from nanogpt_core.train.shard_files import load_optimizer_shards

    path = runs["results"] / "fsdp" / "checkpoints" / "last.pth"
    last = load_checkpoint(path, resume=True)
    model = GPT(GPTConfig(**last["model_args"]))
    model.load_state_dict(last["model"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": rest}], lr=1.0)
    state = load_optimizer_shards(optimizer, path, last["shards"], last["optimizer"])
    ddp = load_checkpoint(runs["results"] / "ddp" / "checkpoints" / "last.pth", resume=True)
    assert state["state"].keys() == ddp["optimizer"]["state"].keys()
    for index, saved in ddp["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(state["state"][index][key], saved[key], rtol=1e-3, atol=1e-6)
        assert float(state["state"][index]["step"]) == 50.0
    assert state["param_groups"][0]["peak_lr"] == ddp["optimizer"]["param_groups"][0]["peak_lr"]


@pytest.mark.slow
def test_fsdp_resumes_exactly_after_sigkill(runs):

    # The kill left a loadable checkpoint (read in the fixture): a .pth and the folder it names.
    assert runs["killed_step"] in (10, 20)
    assert f"last.pth.shards-{runs['killed_step']:06d}" in runs["killed_files"]
    assert f"resuming from step {runs['killed_step']}" in runs["resumed_stdout"]
    assert figures(runs["results"] / "killed") == figures(runs["results"] / "fsdp")
    last = load_checkpoint(runs["results"] / "killed" / "checkpoints" / "last.pth", resume=True)
    assert last["step"] == 50


def figures(folder: Path) -> list[dict]:
    """The metrics lines without what measures the machine (speed, time)."""
    speed = ("mfu", "elapsed_s")  # and tokens_per_sec, response_tokens_per_sec
    return [
        {k: v for k, v in m.items() if k not in speed and not k.endswith("_per_sec")}
        for m in metrics(folder)
    ]


def assert_same_figures(ddp: list[dict], fsdp: list[dict]) -> None:
    """Equal metrics lines, to float tolerance.

    A reduce-scatter sums in another order than DDP's all-reduce (measured:
    losses within 5e-7, gradient norms within 4e-5, relative).
    """
    for a, b in zip(ddp, fsdp, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            rel = 2e-4 if key == "grad_norm" else 1e-5
            assert b[key] == pytest.approx(value, rel=rel), (a["step"], key)


@pytest.mark.slow
def test_fsdp_resumes_at_another_process_count(runs):
    assert f"resuming from step {runs['killed_step']}" in runs["one_stdout"]
    assert "resuming from step 50" in runs["two_stdout"]
    lines = [m for m in metrics(runs["moved"] / "killed") if "lr" in m]
    assert [m["step"] for m in lines] == list(range(5, 76, 5))
    straight = {m["step"]: m["train_loss"] for m in metrics(runs["results"] / "fsdp") if "lr" in m}
    # One process takes half the batch per step: close to the two-process run, not equal.
    for m in lines:
        if m["step"] in straight:
            assert abs(m["train_loss"] - straight[m["step"]]) < 0.1, m


@pytest.mark.slow
def test_an_fsdp_checkpoint_samples_the_greedy_text_of_ddps(runs):
    texts = []
    for name in ("ddp", "fsdp"):
        done = run(
            [sys.executable, "-m", "nanogpt_core", "sample",
             "--ckpt", str(runs["results"] / name / "checkpoints" / "last.pth"),
             "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "40",
             "--device", "cpu"]
        )  # fmt: skip
        texts.append(done.stdout)
    assert texts[0] == texts[1]
    assert texts[0].startswith("ROMEO:") and len(texts[0]) > 40


@pytest.mark.slow
def test_muon_under_fsdp_takes_ddps_steps(runs):
    """Muon orthogonalises each whole matrix, gathered from its shards: DDP's update."""
    short = ["train.optimizer=muon", "train.steps_per_epoch=10", "train.epochs=1",
             "train.eval_every=10", "train.save_every=0"]  # fmt: skip
    paths = runs["experiment"], runs["root"] / "muon", runs["data"]
    run(command(*paths, *short, "name=muon_ddp"))
    run(command(*paths, *short, "name=muon_fsdp", "train.parallelism=fsdp"))
    ddp, fsdp = figures(paths[1] / "muon_ddp"), figures(paths[1] / "muon_fsdp")
    assert [m["step"] for m in fsdp if "lr" in m] == [5, 10]
    assert_same_figures(ddp, fsdp)


@pytest.mark.slow
def test_an_infinity_in_one_shard_makes_every_process_skip_the_scaled_step(tmp_path):
    """fp16's loss scaler on sharded gradients (torch's CPU GradScaler: the CPU has no fp16)."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    probe = Path(__file__).with_name("fsdp_scaler_probe.py")
    run([
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(probe), str(tmp_path),
    ])  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same decisions and norms on both processes
    poisoned, finite = ranks[0]["poisoned"], ranks[0]["finite"]
    assert poisoned["changed"] is False and poisoned["scale"] == 2.0**7  # skipped, halved
    assert poisoned["norm"] == float("inf")
    assert finite["changed"] is True and finite["scale"] == 2.0**7
    assert 0 < finite["norm"] < float("inf")


def test_the_optimizer_state_splits_into_plain_data_and_tensors_and_back():
    import torch

    from nanogpt_core.train.checkpoints import plain_data_problem
    from nanogpt_core.train.shard_files import IN_SHARDS, join_tensors, marked_paths, split_tensors

    state = {
        "muon": {"state": {0: {"momentum_buffer": torch.ones(2, 2)}}, "param_groups": [{"lr": 1}]},
        "adamw": {"state": {1: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}}},
    }
    plain, tensors = split_tensors(state)
    assert plain_data_problem(plain, "optimizer") is None  # loadable with weights_only
    assert plain["adamw"]["state"][1] == {"step": IN_SHARDS, "exp_avg": IN_SHARDS}
    assert sorted(tensors) == sorted(marked_paths(plain)) == [
        "/adamw/state/1/exp_avg", "/adamw/state/1/step", "/muon/state/0/momentum_buffer"
    ]  # fmt: skip
    back = join_tensors(plain, tensors)
    assert back["muon"]["state"][0]["momentum_buffer"] is tensors["/muon/state/0/momentum_buffer"]
    assert back["muon"]["param_groups"] == [{"lr": 1}]


def test_damaged_or_missing_shards_are_one_line_naming_the_file(tmp_path):
    import torch

    from nanogpt_core.train.checkpoints import CheckpointError
    from nanogpt_core.train.shard_files import folder_checksum, load_optimizer_shards

    path = tmp_path / "last.pth"
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    entry = {"folder": "last.pth.shards-000010", "checksum": "0" * 64, "processes": 2}
    with pytest.raises(CheckpointError, match=r"last.pth: its optimizer shards .* are missing"):
        load_optimizer_shards(optimizer, path, entry, {})
    (tmp_path / entry["folder"]).mkdir()
    (tmp_path / entry["folder"] / "__0_0.distcp").write_bytes(b"shard")
    with pytest.raises(CheckpointError, match=r"last.pth: damaged: the optimizer shards in"):
        load_optimizer_shards(optimizer, path, entry, {})
    assert folder_checksum(tmp_path / entry["folder"]) != entry["checksum"]


def test_shard_folders_no_file_names_are_swept(tmp_path):
    from nanogpt_core.train.shard_files import sweep_shard_folders

    names = [
        "last.pth.shards-000010",  # last.pth's previous folder
        "last.pth.shards-000020",  # the one just written
        "last.pth.shards-000030.tmp",  # a killed save's
        "ckpt_epoch_1.pth.shards-000010",  # its file was pruned
        "ckpt_epoch_2.pth.shards-000020",  # its file is there, not rewritten now
    ]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "last.pth").write_bytes(b"")
    (tmp_path / "ckpt_epoch_2.pth").write_bytes(b"")
    sweep_shard_folders(tmp_path, {"last.pth": "last.pth.shards-000020"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_epoch_2.pth", "ckpt_epoch_2.pth.shards-000020", "last.pth", "last.pth.shards-000020"
    ]  # fmt: skip


def test_the_memory_estimate_counts_a_share_plus_what_fsdp_gathers():
    """GPT-2 large (774M) over 4 processes: a quarter of the state, plus the root and two blocks."""
    from nanogpt_core.model.config import GPTConfig
    from nanogpt_core.train.memory import (
        estimate_training_memory,
        parameter_count,
        unit_parameter_counts,
    )

    large = GPTConfig(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50304)
    root, block = unit_parameter_counts(large)
    assert root + 36 * block == parameter_count(large)
    assert root == (50304 + 1024) * 1280 + 1280  # wte (tied head), wpe, ln_f (no bias)
    whole = estimate_training_memory(large, batch_size=1, precision="fp16")
    sharded = estimate_training_memory(large, batch_size=1, precision="fp16", shards=4)
    assert sharded.gradients == -(-whole.gradients // 4)
    assert sharded.optimizer == -(-whole.optimizer // 4)
    assert sharded.weights == -(-whole.weights // 4) + 4 * (root + 2 * block)
    assert sharded.activations == whole.activations
    state = whole.weights + whole.gradients + whole.optimizer
    assert state > 12e9 > 4e9 > sharded.weights + sharded.gradients + sharded.optimizer


@pytest.mark.slow
def test_fsdp_compiled_from_a_checkpoint_and_on_fine_tuning_data_takes_ddps_steps(runs):
    """``compile`` with ``init_from`` (the DDP run's weights), then instruction-tuning batches."""
    from test_finetune import finetune_toml

    root = runs["root"] / "more"
    root.mkdir()
    # The experiment without its callbacks: a sample or an eval recompiles for nothing here.
    experiment = root / "exp.toml"
    experiment.write_text(runs["experiment"].read_text().split("[[callbacks]]")[0])
    start = runs["results"] / "ddp" / "checkpoints" / "last.pth"
    short = ["train.epochs=1", "train.steps_per_epoch=6", "train.eval_every=6",
             "train.save_every=0", "train.compile=true", f"model.init_from={start}"]  # fmt: skip
    paths = experiment, root, runs["data"]
    started = run(command(*paths, *short, "name=init_ddp"))
    run(command(*paths, *short, "name=init_fsdp", "train.parallelism=fsdp"))
    assert f"weights of step 50 of {start}" in started.stdout
    ddp, fsdp = figures(root / "init_ddp"), figures(root / "init_fsdp")
    assert [m["step"] for m in fsdp if "lr" in m] == [5, 6]  # log_every and the last
    assert_same_figures(ddp, fsdp)
    # The weights were the trained ones: far below a fresh model's loss at the same step
    # (measured: 3.34 against 4.63).
    fresh = next(m for m in figures(runs["results"] / "ddp") if m["step"] == 5)
    assert fsdp[0]["train_loss"] < fresh["train_loss"] - 0.5, (fsdp[0], fresh)

    (root / "ft.toml").write_text(finetune_toml("ft_ddp"))
    tune = ["train.epochs=1", "train.steps_per_epoch=4", "train.eval_every=4"]
    paths = root / "ft.toml", root, runs["data"]
    run(command(*paths, *tune))
    run(command(*paths, *tune, "name=ft_fsdp", "train.parallelism=fsdp"))
    ddp, fsdp = figures(root / "ft_ddp"), figures(root / "ft_fsdp")
    assert [m["step"] for m in fsdp if "lr" in m] == [1, 2, 3, 4]
    assert_same_figures(ddp, fsdp)
