"""`gpt serve`: a real server process on a loopback port, driven by the `openai` client."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_chat import ALPACA, GPT2, fine_tune, save, tiny_model  # noqa: E402

from nanogpt_core.data.tokenizers import tokenizer_from_description  # noqa: E402
from nanogpt_core.generate.serve_generation import StopMatcher  # noqa: E402

GPT2_TOKENIZER = tokenizer_from_description(GPT2)

HOST = "127.0.0.1"
MODEL = "tiny_alpaca"  # the run name of tuned_ckpt
MAX_NEW = 40
QUESTIONS = ["What is AI?", "What is 1+1?", "Add the numbers.", "Name a color."]
PROMPTS = ["Once upon a time", "The meaning of life is", "Hello", "1, 2, 3,"]
# Streams longer than --max-tokens-limit's default (4 x block_size 64) allows.
NO_TOKEN_CAP = ("--max-tokens-limit", "100000")


@pytest.fixture(scope="module")
def tuned_ckpt(tmp_path_factory) -> Path:
    """A tiny model fine-tuned through the alpaca template, in a results-like folder."""
    folder = tmp_path_factory.mktemp("serve") / "tiny_alpaca" / "checkpoints"
    folder.mkdir(parents=True)
    return save(folder / "last.pth", fine_tune(tiny_model()), ALPACA.description())


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory) -> Path:
    """An untrained model without a template (a pre-trained checkpoint)."""
    return save(tmp_path_factory.mktemp("plain") / "base.pth", tiny_model().eval(), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A `gpt serve` subprocess and clients pointed at it."""

    def __init__(self, ckpt: Path, *options: str, api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        key = ["--api-key", api_key] if api_key else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nanogpt_core", "serve", "--ckpt", str(ckpt),
             "--host", HOST, "--port", str(self.port), "--device", "cpu", *key, *options],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.api_key = api_key or "unused"
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.process.stderr.read()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError("server did not become healthy")

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0, **options
        )

    def post(self, path: str, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}", **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=60, **kwargs)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.stderr = self.process.communicate(timeout=30)[1]


@contextlib.contextmanager
def running(ckpt: Path, *options: str, api_key: str | None = None) -> Iterator[Server]:
    server = Server(ckpt, *options, api_key=api_key)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tuned_ckpt) -> Iterator[Server]:
    """One server for the tests that do not need special options (8 rows in a batch)."""
    with running(tuned_ckpt, "--max-batch", "8", api_key="sekret") as s:
        yield s


def gpt(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def greedy_sample(ckpt: Path, prompt: str) -> str:
    """What `gpt sample --temperature 0` continues ``prompt`` with (without the prompt)."""
    out = gpt("sample", "--ckpt", str(ckpt), "--prompt", prompt, "--temperature", "0",
              "--max-new-tokens", str(MAX_NEW))  # fmt: skip
    assert out.startswith(prompt)
    return out[len(prompt) :].removesuffix("\n")


def greedy_chat(ckpt: Path, question: str) -> str:
    """What `gpt chat --once --temperature 0` answers."""
    out = gpt("chat", "--ckpt", str(ckpt), "--once", question, "--temperature", "0",
              "--max-new-tokens", str(MAX_NEW))  # fmt: skip
    return out.removesuffix("\n")


def test_stop_matcher_holds_back_a_split_stop_string():
    matcher = StopMatcher(("\nUser:",))
    assert matcher.feed("Hello\nUs") == ("Hello", False)
    assert matcher.feed("er: hi") == ("", True)
    matcher = StopMatcher(("END",))
    assert matcher.feed("aE") == ("a", False)
    assert matcher.feed("x") == ("Ex", False)
    assert matcher.flush() == ""


@pytest.mark.slow
def test_models_health_and_page(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "<title>" in page.text


@pytest.mark.slow
def test_greedy_completion_equals_gpt_sample(server, tuned_ckpt):
    prompt = PROMPTS[0]
    expected = greedy_sample(tuned_ckpt, prompt)
    client = server.client()
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_NEW, temperature=0)
    choice = whole.choices[0]
    assert choice.text == expected
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(GPT2_TOKENIZER.encode(prompt))
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_NEW, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


@pytest.mark.slow
def test_greedy_chat_equals_gpt_chat(server, tuned_ckpt):
    question = "What is AI?"
    expected = greedy_chat(tuned_ckpt, question)
    client = server.client()
    messages = [{"role": "user", "content": question}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_NEW, temperature=0
    )
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    # "stop" at end-of-text, "length" when the limit cut the answer.
    finished_early = whole.usage.completion_tokens < MAX_NEW
    assert whole.choices[0].finish_reason == ("stop" if finished_early else "length")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=MAX_NEW,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.slow
def test_stop_n_seed_and_length(server):
    client = server.client()
    prompt = ALPACA.prompt("What is AI?")  # greedy, the tiny model rambles past 20 tokens
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    text = base.choices[0].text
    assert base.choices[0].finish_reason == "length"
    assert base.usage.completion_tokens == 20
    stop = text[3:6]
    cut = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    seeded = [
        client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=10, seed=7, n=2, temperature=1.0
        )
        for _ in range(2)
    ]
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]
    assert [c.index for c in seeded[0].choices] == [0, 1]


@pytest.mark.slow
def test_eight_concurrent_streams_are_unmixed(server):
    client = server.client(timeout=120)
    jobs = [("completion", p) for p in PROMPTS] + [("chat", q) for q in QUESTIONS]

    def run(kind: str, text: str, stream: bool) -> str:
        if kind == "completion":
            out = client.completions.create(
                model=MODEL, prompt=text, max_tokens=MAX_NEW, temperature=0, stream=stream
            )
            return "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        messages = [{"role": "user", "content": text}]
        out = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=MAX_NEW, temperature=0, stream=stream
        )
        if not stream:
            return out.choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in out)

    expected = [run(kind, text, stream=False) for kind, text in jobs]
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        results[i] = run(*jobs[i], stream=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results.get(i) for i in range(len(jobs))] == expected


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.slow
def test_bad_requests_get_400_and_an_error_object(server):
    post = server.post
    bad_json = post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})  # fmt: skip
    assert error_of(bad_json, 400)["type"] == "invalid_request_error"
    cases = {
        "model": {"model": "gpt-4", "prompt": "x"},
        "max_tokens": {"prompt": "x", "max_tokens": -1},
        "temperature": {"prompt": "x", "temperature": "hot"},
        "prompt": {"prompt": 12},
        "n": {"prompt": "x", "n": 1.5},
    }
    for param, body in cases.items():
        error = error_of(post("/v1/completions", json=body), 400)
        assert error["param"] == param, error
        assert error["type"] == "invalid_request_error"
    no_messages = error_of(post("/v1/chat/completions", json={"messages": []}), 400)
    assert no_messages["param"] == "messages"
    role = error_of(post("/v1/chat/completions", json={"messages": [{"role": "x", "content": "hi"}]}), 400)  # fmt: skip
    assert role["param"].startswith("messages")
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="nope", prompt="x")


@pytest.mark.slow
def test_wrong_or_missing_key_gets_401(server):
    assert error_of(server.post("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert error_of(httpx.get(f"{server.url}/v1/models"), 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong").models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.slow
def test_long_prompt_keeps_its_end_and_says_so(server):
    prompt = "word " * 100
    response = server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert response.status_code == 200
    dropped = len(GPT2_TOKENIZER.encode(prompt)) - 64  # block_size
    assert response.headers["X-Nanogpt-Prompt-Truncated"] == str(dropped)
    assert response.json()["usage"]["prompt_tokens"] == 64
    short = server.post("/v1/completions", json={"prompt": "word", "max_tokens": 2})
    assert "X-Nanogpt-Prompt-Truncated" not in short.headers


@pytest.mark.slow
def test_prepacked_and_plain_linear_layers_answer_alike(tuned_ckpt):
    # The default prepacks the linear layers for oneDNN on the CPU; --no-prepack does not.
    expected = greedy_sample(tuned_ckpt, PROMPTS[1])
    prompts = [PROMPTS[1], *PROMPTS]  # 5 requests at once: prompts of 4 lengths batched
    answers = {}
    for options in ((), ("--no-prepack",)):
        with running(tuned_ckpt, *options) as server:
            client = server.client()

            def complete(prompt: str, client=client) -> str:
                out = client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=MAX_NEW, temperature=0
                )
                return out.choices[0].text

            with ThreadPoolExecutor(len(prompts)) as pool:
                answers[options] = list(pool.map(complete, prompts))
        prepacked = "linear layers prepacked for oneDNN" in server.stderr
        assert prepacked == (not options), server.stderr
    assert answers[()][0] == answers[()][2] == expected  # PROMPTS[1] twice in one batch
    assert answers[()] == answers[("--no-prepack",)]


@pytest.mark.slow
def test_plain_transcript_without_a_template(plain_ckpt):
    with running(plain_ckpt) as server:
        out = server.client().chat.completions.create(
            model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=30
        )
        assert "\nUser:" not in out.choices[0].message.content


@pytest.mark.slow
def test_full_queue_gets_429_and_a_disconnect_frees_the_slot(plain_ckpt):
    # The options of 0.3 (--max-concurrency, --queue-size) still work, with a warning.
    with running(
        plain_ckpt, "--max-concurrency", "1", "--queue-size", "1", *NO_TOKEN_CAP
    ) as server:
        body = {"prompt": "x", "max_tokens": 100000, "stream": True}
        first = httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60)
        second = httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60)
        r1 = first.__enter__()
        lines = r1.iter_lines()
        next(lines)  # generating
        r2 = second.__enter__()  # admitted, waiting for the slot
        assert r2.status_code == 200
        third = server.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert error_of(third, 429)["type"] == "rate_limit_error"
        # The generating client disconnects: the waiting one gets the slot at once.
        first.__exit__(None, None, None)
        start = time.monotonic()
        waiting = r2.iter_lines()
        assert next(waiting).startswith("data: ")
        assert time.monotonic() - start < 5
        second.__exit__(None, None, None)
        # Both slots are free again: a short request is answered promptly.
        start = time.monotonic()
        done = server.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert done.status_code == 200 and time.monotonic() - start < 5
    assert "Warning: --max-concurrency is deprecated; use --max-batch" in server.stderr
    assert "Warning: --queue-size is deprecated; use --max-queue" in server.stderr


@pytest.mark.slow
def test_sigterm_lets_a_stream_finish_and_exits_0(plain_ckpt):
    server = Server(plain_ckpt, *NO_TOKEN_CAP)
    try:
        # Several seconds of tokens: the stream is still going when SIGTERM comes.
        body = {"prompt": "x", "max_tokens": 3000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            server.process.send_signal(signal.SIGTERM)
            rest = list(lines)
        events = [line for line in rest if line]
        assert events[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in events[-2]
        assert len(events) > 1000  # most of the answer came after SIGTERM
        assert server.process.wait(timeout=30) == 0
        assert "Traceback" not in server.process.stderr.read()
        # It no longer accepts connections.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.url}/health", timeout=2)
    finally:
        server.stop()


def test_without_the_extra_one_line_and_exit_2():
    # find_spec is what `gpt serve` asks; pretending fastapi is absent is enough.
    code = (
        "import importlib.util, sys; real = importlib.util.find_spec;"
        "importlib.util.find_spec = lambda n, *a: None if n == 'fastapi' else real(n, *a);"
        "from nanogpt_core.cli import main; main(['serve', '--ckpt', 'x.pth'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr == "Error: gpt serve needs the serve extra: pip install 'nanogpt[serve]'\n"


def test_in_process_app_answers_and_refuses(plain_ckpt):
    from fastapi.testclient import TestClient

    from nanogpt_core.generate.sampling import load_model
    from nanogpt_core.generate.serve import create_app

    app = create_app(load_model(plain_ckpt, "cpu"), api_key="k", model_name="base")
    with TestClient(app) as client:
        headers = {"Authorization": "Bearer k"}
        assert client.get("/v1/models", headers=headers).json()["data"][0]["id"] == "base"
        body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}
        answer = client.post("/v1/completions", json=body, headers=headers).json()
        assert answer["usage"]["completion_tokens"] <= 3
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        wrong = client.post("/v1/completions", json={**body, "max_tokens": -1}, headers=headers)
        assert error_of(wrong, 400)["param"] == "max_tokens"
        assert error_of(client.post("/v1/completions", json=body), 401)


def test_one_failing_request_gets_500_and_the_others_their_answers(plain_ckpt, monkeypatch):
    """A request whose generation raises (injected) fails alone: 500, or an error event."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from nanogpt_core.generate.sampling import load_model
    from nanogpt_core.generate.serve import create_app
    from nanogpt_core.generate.serve_generation import Row

    poison = GPT2_TOKENIZER.encode("poison")
    take = Row.take

    def poisoned(self, token):
        if self.job.ids == poison and self.count == 2:
            raise RuntimeError("poisoned row")
        return take(self, token)

    prompts = ["Once upon a time", "Hello", "The meaning of life is", "1, 2, 3,"]
    app = create_app(load_model(plain_ckpt, "cpu"), max_batch=8, model_name="base")
    with TestClient(app) as client:

        def ask(prompt: str, stream: bool = False) -> httpx.Response:
            body = {"prompt": prompt, "max_tokens": 20, "temperature": 0, "stream": stream}
            return client.post("/v1/completions", json=body)

        alone = [ask(p).json()["choices"][0]["text"] for p in prompts]
        monkeypatch.setattr(Row, "take", poisoned)
        with ThreadPoolExecutor(6) as pool:
            bad = pool.submit(ask, "poison")
            bad_stream = pool.submit(ask, "poison", True)
            good = [pool.submit(ask, p) for p in prompts]
            answers = [f.result() for f in good]
        assert [a.json()["choices"][0]["text"] for a in answers] == alone
        assert app.state.engine.largest_batch >= 2  # they did decode together
        error = error_of(bad.result(), 500)
        assert error["type"] == "server_error" and "poisoned row" in error["message"]
        events = [line for line in bad_stream.result().text.splitlines() if line]
        assert '"error"' in events[-1] and "poisoned row" in events[-1]
