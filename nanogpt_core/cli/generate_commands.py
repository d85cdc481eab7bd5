"""The commands that put a trained checkpoint to use.

``gpt sample``, ``gpt chat`` and ``gpt serve`` generate text from it; ``gpt
export`` hands it to Hugging Face transformers. Each imports torch (and the
server, the exporter) inside the command, so ``gpt --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from nanogpt_core.cli.gpt_group import plugins_of
from nanogpt_core.cli.shared_options import (
    DEVICE,
    FiniteFloatRange,
    ckpt_option,
    folder_path,
    sampling_options,
)
from nanogpt_core.errors import NanoGPTError

API_KEY_ENV = "NANOGPT_API_KEY"


@click.command()
@ckpt_option("A checkpoint, e.g. results/<name>/checkpoints/last.pth.")
@click.option("--prompt", default=None, help="Text to continue (default: start of text).")
@click.option(
    "--prompt-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Read the prompt from a file.",
)
@click.option("--num-samples", default=1, show_default=True, type=click.IntRange(min=1))
@sampling_options
def sample(
    ckpt: Path,
    prompt: str | None,
    prompt_file: Path | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float | None,
    num_samples: int,
    seed: int,
    device: str,
) -> None:
    """Generate text from a checkpoint, streamed to stdout.

    The tokenizer comes from the checkpoint, so no data folder or experiment
    file is needed. BPE models stop at end-of-text.

    \b
    Examples:
      gpt sample --ckpt results/shakespeare_char/checkpoints/last.pth --prompt "ROMEO:"
      gpt sample --ckpt last.pth --temperature 0 --max-new-tokens 100
      gpt sample --ckpt last.pth --prompt-file prompt.txt --num-samples 3 --top-p 0.9
    """
    import torch

    from nanogpt_core.generate.sampling import encode_prompt, load_model, stream_sample

    prompt = _prompt_text(prompt, prompt_file)
    loaded = load_model(ckpt, device)
    ids, dropped = encode_prompt(loaded, prompt)
    if dropped:
        click.echo(
            f"note: the prompt has {len(ids) + dropped} tokens; keeping its last "
            f"{len(ids)} (the model's block_size)",
            err=True,
        )
    generator = torch.Generator(device=loaded.device).manual_seed(seed)
    shown_prompt = loaded.tokenizer.decode(ids) if prompt else ""
    for n in range(num_samples):
        if n:
            click.echo("---------------")
        click.echo(shown_prompt, nl=False)
        for piece in stream_sample(
            loaded,
            ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        ):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()


def _prompt_text(prompt: str | None, prompt_file: Path | None) -> str | None:
    """The prompt ``gpt sample`` continues: ``--prompt``, or ``--prompt-file``'s text."""
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            return prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise NanoGPTError(f"--prompt-file {prompt_file}: not UTF-8 text") from None
    return prompt


@click.command()
@ckpt_option("A fine-tuned checkpoint, e.g. results/<name>/checkpoints/last.pth.")
@click.option(
    "--once", "question", default=None, metavar="QUESTION", help="Answer one question and exit."
)
@click.option(
    "--input",
    "input_text",
    default=None,
    metavar="TEXT",
    help="With --once: the input (context) that goes with the question.",
)
@sampling_options
@click.pass_context
def chat(
    ctx: click.Context,
    ckpt: Path,
    question: str | None,
    input_text: str | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float | None,
    seed: int,
    device: str,
) -> None:
    """Talk to a fine-tuned checkpoint through the template it was trained with.

    Answers stream as they are generated and end at end-of-text. Commands:
    /reset, /temperature X, /quit; Ctrl-D or Ctrl-C at the prompt ends, Ctrl-C
    during an answer stops that answer. With stdin not a terminal, each line is
    one question, answered on its own, and each answer is followed by a blank line.

    \b
    Examples:
      gpt chat --ckpt results/alpaca/checkpoints/last.pth
      gpt chat --ckpt last.pth --once "What is AI?" --temperature 0
      gpt chat --ckpt last.pth --once "Summarize this." --input "A long text..."
      gpt chat --ckpt last.pth < questions.txt > answers.txt
    """
    from nanogpt_core.generate.chat import ChatSettings, start_chat

    if input_text is not None and question is None:
        raise click.UsageError("--input goes with --once")
    settings = ChatSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
    )
    start_chat(
        ckpt,
        settings=settings,
        seed=seed,
        device=device,
        question=question,
        input=input_text or "",
        plugins=plugins_of(ctx),
    )


@click.command()
@ckpt_option("A checkpoint, e.g. results/<name>/checkpoints/last.pth.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free one).",
)
@click.option(
    "--api-key",
    default=None,
    envvar=API_KEY_ENV,
    help="Require 'Authorization: Bearer KEY' on /v1/ and /metrics (env: NANOGPT_API_KEY); "
    "an empty key is refused.",
)
@click.option(
    "--max-batch",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rows (request choices) decoded together, whatever their prompt lengths.",
)
@click.option(
    "--max-queue",
    default=16,
    show_default=True,
    type=click.IntRange(min=0),
    help="Requests waiting for a place in the batch; more get HTTP 429.",
)
@click.option(
    "--prefill-chunk",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Prompt tokens prefilled per step, between decode steps of the running batch.",
)
@click.option(
    "--request-timeout",
    default=None,
    type=FiniteFloatRange(min=0, min_open=True),
    help="Seconds a request may generate; then it ends with finish_reason 'length'.",
)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
    help="Weights and KV cache; auto: float16 on CUDA 7.x, bfloat16 from 8.0, else float32.",
)
@click.option(
    "--prepack/--no-prepack",
    default=True,
    show_default=True,
    help="On the CPU in float32, lay the linear weights out for oneDNN at --max-batch rows "
    "once (a full batch decodes about 1.6x faster; the tied output layer takes a second "
    "copy); --no-prepack: torch's own linear.",
)
@click.option(
    "--max-concurrency",
    default=None,
    type=click.IntRange(min=1),
    help="Deprecated: use --max-batch.",
)
@click.option(
    "--queue-size", default=None, type=click.IntRange(min=0), help="Deprecated: use --max-queue."
)
@click.option(
    "--max-tokens-limit",
    default=None,
    type=click.IntRange(min=1),
    show_default="4 x the model's block_size",
    help="Largest max_tokens a request may ask for; more get HTTP 400.",
)
@click.option(
    "--metrics-public",
    is_flag=True,
    help="Serve /metrics without the API key (for a scraper inside a trusted network).",
)
@click.option(
    "--grace",
    default=10.0,
    show_default=True,
    type=FiniteFloatRange(min=0),
    help="Seconds that streams in flight get to finish after SIGTERM.",
)
@DEVICE
def serve(
    ckpt: Path,
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int,
    max_queue: int,
    prefill_chunk: int,
    request_timeout: float | None,
    dtype: str,
    prepack: bool,
    max_concurrency: int | None,
    queue_size: int | None,
    max_tokens_limit: int | None,
    metrics_public: bool,
    grace: float,
    device: str,
) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page at /.

    Endpoints: /v1/completions, /v1/chat/completions (through the checkpoint's
    template), /v1/models, /health, /metrics (Prometheus). SIGTERM lets streams
    in flight finish (up to --grace seconds) and exits 0. An empty --api-key, a
    host that does not resolve, a port in use or a bad checkpoint: one line, exit 2.

    \b
    Examples:
      gpt serve --ckpt results/alpaca/checkpoints/last.pth
      gpt serve --ckpt last.pth --port 8080 --api-key secret --max-batch 16
    """
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("fastapi", "uvicorn")):
        raise NanoGPTError("gpt serve needs the serve extra: pip install 'nanogpt[serve]'")
    from nanogpt_core.generate.serve import serve as run_server

    # The options of 0.3 still work: every request now decodes in one batch.
    if max_concurrency is not None:
        click.echo("Warning: --max-concurrency is deprecated; use --max-batch", err=True)
        max_batch = max_concurrency
    if queue_size is not None:
        click.echo("Warning: --queue-size is deprecated; use --max-queue", err=True)
        max_queue = queue_size

    # click takes an empty variable for an unset one; an empty key must be refused, not
    # read as "no key" (authentication silently off).
    if api_key is None and os.environ.get(API_KEY_ENV) == "":
        api_key = ""

    run_server(
        ckpt,
        host=host,
        port=port,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
        request_timeout=request_timeout,
        dtype=dtype,
        prepack=prepack,
        grace=grace,
        device=device,
        max_tokens_limit=max_tokens_limit,
        metrics_public=metrics_public,
    )


@click.command()
@ckpt_option("The checkpoint to export.")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    callback=folder_path,
    help="A new folder for the export.",
)
@click.pass_context
def export(ctx: click.Context, ckpt: Path, out: Path) -> None:
    """Export a checkpoint as a Hugging Face transformers GPT-2 folder.

    GPT2LMHeadModel.from_pretrained(OUT) then gives the same logits as ours;
    GPT-2 BPE models also get their tokenizer files, and a fine-tuned model's
    template becomes the chat_template of tokenizer_config.json.

    \b
    Examples:
      gpt export --ckpt results/fineweb_gpt2/checkpoints/last.pth --out exports/fineweb_gpt2
    """
    from nanogpt_core.model.hf_export import export_hf

    written = export_hf(ckpt, out, plugins_of(ctx))
    click.echo(f"exported {ckpt} to {out}/: {', '.join(written)}")
