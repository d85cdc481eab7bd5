"""`gpt serve` under bad and abandoned requests, failing starts, shutdown, and /metrics.

Real `gpt serve` processes on loopback ports (the helpers of test_serve.py), bad
values as a client would send them, and the start-up failures as a user meets
them: one line on stderr, exit 2, no traceback.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
prom_parser = pytest.importorskip("prometheus_client.parser")

from test_chat import save, tiny_model  # noqa: E402
from test_serve import HOST, NO_TOKEN_CAP, PROMPTS, Server, error_of, running  # noqa: E402

KEY = "ops-key"
# The values: each crashed a request (and its batch) before they were checked.
POISON = {
    "seed": {"seed": 2**64},
    "temperature": {"temperature": 1e-300},
    "max_tokens": {"max_tokens": 1_000_000_000},
}
TINY_TEMPERATURE = {"temperature": 5e-324}


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    """An untrained model without a template, as in test_serve.py."""
    return save(tmp_path_factory.mktemp("ops") / "base.pth", tiny_model().eval(), None)


@pytest.fixture(scope="module")
def server(base_ckpt) -> Iterator[Server]:
    """8 requests decode at once; max_tokens is capped at its default (4 x block_size 64)."""
    with running(base_ckpt, "--max-batch", "8", api_key=KEY) as s:
        yield s


def complete(server: Server, body: dict) -> tuple[int, str]:
    """Status and text of one completion; a stream's text is its pieces joined."""
    if not body.get("stream"):
        response = server.post("/v1/completions", json=body)
        if response.status_code != 200:
            return response.status_code, response.text
        return 200, response.json()["choices"][0]["text"]
    headers = {"Authorization": f"Bearer {server.api_key}"}
    url = f"{server.url}/v1/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
        if response.status_code != 200:
            return response.status_code, response.read().decode()
        text = ""
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text += "".join(choice["text"] for choice in chunk["choices"])
        return 200, text


@pytest.mark.slow
def test_bad_values_are_refused_before_they_reach_a_batch(server):
    for stream in (False, True):
        for param, bad in [*POISON.items(), ("temperature", TINY_TEMPERATURE)]:
            body = {"prompt": "Hello", "max_tokens": 4, **bad, "stream": stream}
            url = f"{server.url}/v1/completions"
            headers = {"Authorization": f"Bearer {KEY}"}
            error = error_of(httpx.post(url, json=body, headers=headers, timeout=60), 400)
            assert error["param"] == param, (bad, stream, error)
            assert error["message"].startswith(f"{param}: ")
    cap = error_of(server.post("/v1/completions", json={"prompt": "x", "max_tokens": 257}), 400)
    assert "limit of 256" in cap["message"] and "--max-tokens-limit" in cap["message"]
    assert (
        server.post("/v1/completions", json={"prompt": "x", "max_tokens": 256}).status_code == 200
    )
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 300}
    assert error_of(server.post("/v1/chat/completions", json=chat), 400)["param"] == (
        "max_completion_tokens"
    )
    for raw in (b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": 1e999}'):
        response = server.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})  # fmt: skip
        assert "finite number" in error_of(response, 400)["message"]
    huge_k = server.post("/v1/completions", json={"prompt": "x", "top_k": 2**63})
    assert error_of(huge_k, 400)["param"] == "top_k"


@pytest.mark.slow
def test_good_requests_sent_with_poisoned_ones_get_their_unbatched_answers(server):
    good = [{"prompt": p, "max_tokens": 20, "temperature": 0} for p in PROMPTS]
    good.append({"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0.8, "seed": 5})
    good = [{**body, "stream": i % 2 == 1} for i, body in enumerate(good)]
    alone = [complete(server, body) for body in good]
    assert all(status == 200 for status, _ in alone)
    poisoned = [{"prompt": "Once upon a time", "max_tokens": 20, **bad, "stream": stream}
                for bad in POISON.values() for stream in (False, True)]  # fmt: skip
    bodies = good + poisoned
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: complete(server, body), bodies))
    assert together[: len(good)] == alone
    assert [status for status, _ in together[len(good) :]] == [400] * len(poisoned)


@pytest.mark.slow
def test_metrics_count_what_was_sent(server):
    def scrape() -> dict:
        response = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        samples = {}
        for family in prom_parser.text_string_to_metric_families(response.text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def value(samples: dict, name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    before = scrape()
    ok = {"route": "/v1/completions", "status": "200"}
    streamed_body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True}
    streamed = complete(server, {**streamed_body, "stream_options": {"include_usage": True}})
    whole = server.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 7, "n": 2})
    assert streamed[0] == 200 and whole.status_code == 200
    server.post("/v1/completions", json={"prompt": "x", "seed": -1})
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    prompt_ids = whole.json()["usage"]["prompt_tokens"]  # "Hello": the same prompt twice
    assert delta("nanogpt_requests_total", **ok) == 2
    assert delta("nanogpt_requests_total", route="/v1/completions", status="400") == 1
    assert delta("nanogpt_requests_total", route="/v1/models", status="401") == 1
    assert delta("nanogpt_prompt_tokens_total") == 2 * prompt_ids
    # Greedy: the streamed answer's tokens are those of the same request answered whole.
    twin = server.post("/v1/completions", json={**streamed_body, "stream": False}).json()
    assert twin["choices"][0]["text"] == streamed[1]
    completion = whole.json()["usage"]["completion_tokens"] + twin["usage"]["completion_tokens"]
    assert delta("nanogpt_completion_tokens_total") == completion
    assert delta("nanogpt_time_to_first_token_seconds_count") == 2
    # The streamed answer's 5 tokens and the 2 choices of 7: a gap after each but the first.
    assert 0 < delta("nanogpt_inter_token_latency_seconds_count") <= 4 + 2 * 6
    assert value(after, "nanogpt_queue_depth") == 0 and value(after, "nanogpt_batch_size") == 0
    assert error_of(httpx.get(f"{server.url}/metrics"), 401)["code"] == "invalid_api_key"


def test_metrics_public_needs_no_key_but_the_api_still_does(base_ckpt):
    from fastapi.testclient import TestClient

    from nanogpt_core.generate.sampling import load_model
    from nanogpt_core.generate.serve import create_app

    app = create_app(load_model(base_ckpt, "cpu"), api_key="k", metrics_public=True)
    with TestClient(app) as client:
        scraped = client.get("/metrics")
        assert scraped.status_code == 200 and "nanogpt_requests_total" in scraped.text
        assert client.get("/v1/models").status_code == 401


def test_without_prometheus_client_metrics_says_what_to_install(base_ckpt, monkeypatch):
    from fastapi.testclient import TestClient

    from nanogpt_core.generate.sampling import load_model
    from nanogpt_core.generate.serve import create_app

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # its import now fails
    app = create_app(load_model(base_ckpt, "cpu"))
    with TestClient(app) as client:
        missing = error_of(client.get("/metrics"), 404)
        assert (
            missing["message"] == "/metrics needs prometheus_client: pip install 'nanogpt[serve]'"
        )
        body = {"prompt": "Hello", "max_tokens": 2}
        assert client.post("/v1/completions", json=body).status_code == 200


@pytest.mark.slow
def test_a_non_streamed_request_whose_client_left_frees_its_slot(base_ckpt):
    # One slot: while the abandoned request generated, the next would wait for its end.
    with running(base_ckpt, "--max-batch", "1", *NO_TOKEN_CAP) as server:
        body = {"prompt": "x", "max_tokens": 100000}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.5)
        start = time.monotonic()
        done = server.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert done.status_code == 200
        assert time.monotonic() - start < 5


def gpt_serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", "serve", "--device", "cpu", *args],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.slow
def test_start_up_failures_are_one_line_and_exit_2(base_ckpt, tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(base_ckpt.read_bytes()[:1000])
    ckpt = ["--ckpt", str(base_ckpt)]
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = {  # (arguments, environment, what the line says)
            "empty key": ([*ckpt, "--api-key", ""], {}, "--api-key (or NANOGPT_API_KEY) is empty"),
            "empty env key": (ckpt, {"NANOGPT_API_KEY": ""}, "is empty"),
            "port in use": ([*ckpt, "--host", HOST, "--port", port], {}, "the port is in use"),
            "bad host": ([*ckpt, "--host", "no-such-host.invalid"], {}, "cannot resolve"),
            # --port 0: a free port, so only the checkpoint can fail.
            "missing": (["--ckpt", str(tmp_path / "none.pth"), "--port", "0"], {}, "file not found"),
            "corrupt": (["--ckpt", str(corrupt), "--port", "0"], {}, "not a readable checkpoint"),
        }  # fmt: skip
        # Side by side: each is a Python start-up, most of the test's time.
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            runs = {case: pool.submit(gpt_serve, *args, env=env) for case, (args, env, _) in cases.items()}  # fmt: skip
            done = {case: run.result() for case, run in runs.items()}
    for case, (_, _, words) in cases.items():
        stderr = done[case].stderr
        assert done[case].returncode == 2, (case, stderr)
        assert stderr.startswith("Error: ") and stderr.count("\n") == 1, (case, stderr)
        assert words in stderr, (case, stderr)


@pytest.mark.slow
def test_sigterm_cuts_what_outlives_the_grace_in_one_line_and_exits_0(base_ckpt):
    server = Server(base_ckpt, "--grace", "1", *NO_TOKEN_CAP)
    try:
        body = {"prompt": "x", "max_tokens": 100000, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            server.process.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.RemoteProtocolError):  # cut after the grace second
                list(lines)
        assert server.process.wait(timeout=30) == 0
        stderr = server.process.stderr.read()
        assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
        assert "stopping: --grace ended; 1 request(s) still running were cut" in stderr
    finally:
        server.stop()


def test_an_empty_key_is_refused_in_process_too():
    from nanogpt_core.errors import NanoGPTError
    from nanogpt_core.generate.serve_startup import check_api_key

    for key in ("", "  "):
        with pytest.raises(NanoGPTError, match="is empty"):
            check_api_key(key)
    check_api_key(None)
    check_api_key("k")
