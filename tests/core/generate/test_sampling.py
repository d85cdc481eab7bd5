"""`gpt sample` and generation: the KV cache, streaming, prompts, refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nanogpt_core.cli import make_cli
from nanogpt_core.generate.sampling import load_model
from nanogpt_core.model.gpt import GPT, GPTConfig
from nanogpt_core.model.next_token import pick_next_token
from nanogpt_core.plugins.registry import load_plugins


def cli_run(*args):
    return CliRunner().invoke(make_cli(load_plugins(disabled=())), list(args))


@pytest.mark.parametrize("prompt_len", [1, 10, 40])
def test_greedy_with_the_kv_cache_equals_full_recomputation(prompt_len):
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=64, vocab_size=128, n_layer=3, n_head=4, n_embd=48, bias=True)
    ).eval()
    prompt = torch.randint(0, 128, (2, prompt_len))
    new = 64 - prompt_len
    cached = model.generate(prompt, new, temperature=0, use_cache=True)
    full = model.generate(prompt, new, temperature=0, use_cache=False)
    assert torch.equal(cached, full)


def test_cached_logits_match_full_forward_at_every_step():
    from nanogpt_core.model.gpt import KVCache

    torch.manual_seed(1)
    model = GPT(
        GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=True)
    ).eval()
    tokens = torch.randint(0, 64, (1, 32))
    cache = KVCache(model.config)
    with torch.no_grad():
        model(tokens[:, :5], cache=cache)
        for t in range(5, 32):
            step_logits, _ = model(tokens[:, t : t + 1], cache=cache)
            full_logits, _ = model(tokens[:, : t + 1])
            assert torch.allclose(step_logits, full_logits, atol=1e-5), t


def test_generation_past_the_block_size_keeps_going():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16, bias=True)
    ).eval()
    out = model.generate(
        torch.zeros(1, 4, dtype=torch.long), 60, temperature=1.0, top_k=5, top_p=0.9
    )
    assert out.shape == (1, 64) and int(out.max()) < 32


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    picks = {
        int(pick_next_token(logits.clone(), 1.0, None, 0.7, torch.Generator().manual_seed(s), None))
        for s in range(200)
    }
    assert picks == {0, 1}


def test_sample_from_a_char_checkpoint_streams_text(char_checkpoint):
    args = ["sample", "--ckpt", str(char_checkpoint), "--prompt", "ROMEO:"]
    args += ["--max-new-tokens", "30", "--seed", "1"]
    result = cli_run(*args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ROMEO:")
    assert len(result.output) == len("ROMEO:") + 30 + 1
    assert cli_run(*args).output == result.output  # the same seed, the same text


def test_start_of_text_without_a_prompt(char_checkpoint, bpe_checkpoint):
    from nanogpt_core.generate.sampling import encode_prompt

    char = load_model(char_checkpoint, "cpu")
    assert encode_prompt(char, None) == (char.tokenizer.encode("\n"), 0)
    assert encode_prompt(load_model(bpe_checkpoint, "cpu"), "") == ([50256], 0)


def test_greedy_samples_and_several_samples(char_checkpoint, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("KING:")
    greedy = cli_run(
        "sample",
        "--ckpt",
        str(char_checkpoint),
        "--prompt-file",
        str(prompt),
        "--temperature",
        "0",
        "--max-new-tokens",
        "10",
        "--num-samples",
        "2",
    )
    assert greedy.exit_code == 0, greedy.output
    first, second = greedy.output.split("\n---------------\n")
    assert first == second.rstrip("\n") and first.startswith("KING:")


def test_long_prompt_keeps_its_last_block_size_tokens(char_checkpoint):
    result = CliRunner().invoke(
        make_cli(load_plugins(disabled=())),
        ["sample", "--ckpt", str(char_checkpoint), "--prompt", "a" * 100, "--max-new-tokens", "3"],
    )
    assert result.exit_code == 0
    assert (
        "note: the prompt has 100 tokens; keeping its last 64" in result.output
    )  # stderr is mixed in
    assert "a" * 64 in result.output and "a" * 65 not in result.output


def test_bpe_sampling_stops_at_end_of_text(bpe_checkpoint):
    from nanogpt_core.generate.sampling import stream_sample

    loaded = load_model(bpe_checkpoint, "cpu")
    loaded.model.lm_head.weight.data[50256] += 100.0  # make <|endoftext|> certain: an empty sample
    pieces = list(
        stream_sample(
            loaded,
            [50256],
            max_new_tokens=20,
            temperature=0,
            top_k=None,
            top_p=None,
            generator=None,
        )
    )
    assert pieces == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt", "missing.pth"], "Error: missing.pth: file not found"),
        (
            ["--prompt", "ROMEO~"],
            "Error: prompt: character '~' is not in this model's 65-character vocabulary",
        ),
    ],
)
def test_sample_refusals_are_one_line(char_checkpoint, args, message):
    if "--ckpt" not in args:
        args = ["--ckpt", str(char_checkpoint), *args]
    result = cli_run("sample", *args)
    assert result.exit_code == 2
    assert result.output.strip() == message


def test_sample_refuses_corrupt_and_unsafe_files_in_a_subprocess(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 not really")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": subprocess.Popen, "model_args": {}, "step": 0, "tokenizer": {}}, unsafe)
    gpt = str(Path(sys.executable).with_name("gpt"))
    for path, message in (
        (corrupt, "not a readable checkpoint"),
        (unsafe, "refused: loading it would run pickled code"),
    ):
        done = subprocess.run([gpt, "sample", "--ckpt", str(path)], capture_output=True, text=True)
        assert done.returncode == 2
        assert message in done.stderr and "Traceback" not in done.stderr
