"""`gpt serve`'s chat page in headless Chromium: streaming, stop, stats, new chat, the API key.

The real server runs as a subprocess on a free loopback port, and Selenium drives
Debian's ``chromium`` through its ``chromedriver`` (both from apt: ``.ci/run``
installs them); without them the tests skip. The model is tiny and untrained, made
never to sample end-of-text: with a large max-tokens its answers are long enough
to watch them grow and to stop them.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
import torch

from nanogpt_core.model.gpt import GPT, GPTConfig
from nanogpt_core.train.checkpoints import save_checkpoint
from nanogpt_plugins.templates.alpaca import AlpacaTemplate

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
GPT2 = {"kind": "gpt2", "name": "gpt2", "vocab_size": 50257, "eot_id": 50256}
API_KEY = "page-test-key"

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
        "apt-get install chromium chromium-driver",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An untrained tiny model with the alpaca template, as a fine-tuning run saves it."""
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=1024, vocab_size=50304, n_layer=1, n_head=2, n_embd=32, bias=True)
    )
    with torch.no_grad():
        # Never end early: end-of-text's logit is about -10 whatever the input (the last
        # LayerNorm adds 10 along the first axis, and end-of-text's output row is -1 there).
        model.transformer.ln_f.bias[0] = 10.0
        model.lm_head.weight[GPT2["eot_id"]] = 0.0
        model.lm_head.weight[GPT2["eot_id"], 0] = -1.0
    path = tmp_path_factory.mktemp("ckpt") / "last.pth"
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "model_args": attrs.asdict(model.config),
            "step": 0,
            "tokenizer": GPT2,
            "template": AlpacaTemplate().description(),
        },
    )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def start_server(ckpt: Path, tmp_path_factory) -> Iterator[Callable[..., str]]:
    """Start ``gpt serve`` (extra options as arguments) and return its base URL once healthy."""
    servers: list[subprocess.Popen] = []

    def start(*options: str) -> str:
        port = free_port()
        log = tmp_path_factory.mktemp("serve") / "server.log"
        command = [sys.executable, "-m", "nanogpt_core", "serve", "--ckpt", str(ckpt)]
        with log.open("wb") as handle:
            server = subprocess.Popen(
                [*command, "--port", str(port), *options],
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        servers.append(server)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"gpt serve exited {server.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    return url
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        pytest.fail(f"gpt serve did not answer /health in 120 s:\n{log.read_text()}")

    yield start
    for server in servers:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def server(start_server: Callable[..., str]) -> str:
    """A ``gpt serve`` without an API key, shared by the module's tests."""
    return start_server()


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium that keeps the page's console log."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1000,760")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def set_field(driver: webdriver.Chrome, selector: str, value: str) -> None:
    field = driver.find_element(By.CSS_SELECTOR, selector)
    field.clear()
    field.send_keys(value)


def texts(driver: webdriver.Chrome, selector: str) -> list[str]:
    return [element.text for element in driver.find_elements(By.CSS_SELECTOR, selector)]


def wait_idle(driver: webdriver.Chrome, timeout: float = 60) -> None:
    """Wait until no answer is streaming: Send enabled again, Stop disabled."""
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: (
            d.find_element(By.ID, "send").is_enabled()
            and not d.find_element(By.ID, "stop").is_enabled()
        )
    )


def console_errors(driver: webdriver.Chrome) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_page_streams_stops_and_starts_a_new_chat(server: str, browser, tmp_path: Path) -> None:
    browser.get(f"{server}/")
    assert browser.title == "nanoGPT chat"
    set_field(browser, "#temperature", "1")
    set_field(browser, "#max-tokens", "4000")

    assert browser.find_element(By.ID, "messages").get_attribute("aria-live") == "polite"

    # Shift+Enter is a new line; Enter sends; the answer streams in, growing poll after poll.
    field = browser.find_element(By.ID, "input")
    field.send_keys("What", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "is AI?")
    assert field.get_attribute("value") == "What\nis AI?"
    assert texts(browser, ".message") == []
    field.clear()
    field.send_keys("What is AI?", Keys.ENTER)
    assert texts(browser, ".message.user") == ["What is AI?"]
    lengths: list[int] = []
    deadline = time.monotonic() + 60
    while len(set(lengths)) < 4 and time.monotonic() < deadline:
        lengths += [len("".join(texts(browser, ".message.assistant")))]
        time.sleep(0.05)
    growth = sorted(set(lengths))
    assert len(growth) >= 4, f"the answer did not stream in: lengths {lengths}"
    assert lengths == sorted(lengths)
    assert browser.find_element(By.ID, "stop").is_enabled()

    # Stop during the answer: the partial answer stays and stops changing; the input works.
    browser.find_element(By.ID, "stop").click()
    wait_idle(browser, timeout=10)
    (stopped,) = texts(browser, ".message.assistant")
    assert texts(browser, ".message.assistant .note") == ["stopped"]
    assert len(stopped) >= growth[-1]
    time.sleep(1)
    assert texts(browser, ".message.assistant") == [stopped]

    # The conversation goes on: a second question, short this time (max tokens reached).
    set_field(browser, "#max-tokens", "3")
    browser.find_element(By.ID, "input").send_keys("And what is 1+1?", Keys.ENTER)
    wait_idle(browser)
    assert texts(browser, ".message.user") == ["What is AI?", "And what is 1+1?"]
    assistant = texts(browser, ".message.assistant")
    assert len(assistant) == 2 and assistant[0] == stopped
    assert texts(browser, ".message.assistant .note")[-1] == "stopped at the max tokens limit"
    # Each answer, the stopped one too, shows its tokens, tokens/s and time to first token.
    stats = browser.find_elements(By.CSS_SELECTOR, ".message.assistant .stats")
    assert len(stats) == 2
    short = stats[1]
    assert short.get_attribute("data-tokens") == "3"  # the usage chunk's count
    assert 0 < float(short.get_attribute("data-ttft")) < 60
    assert 0.1 < float(short.get_attribute("data-rate")) < 1e6
    assert re.fullmatch(r"3 tokens · \d+\.\d tokens/s · first token after \d+\.\d\d s", short.text)
    # Stopped, no usage chunk came: its pieces are counted, at least one per growth seen.
    assert int(stats[0].get_attribute("data-tokens")) >= len(growth)
    assert 0.1 < float(stats[0].get_attribute("data-rate")) < 1e6
    assert browser.find_element(By.ID, "input").get_attribute("value") == ""
    assert browser.find_element(By.ID, "error").text == ""

    screenshot = tmp_path / "serve_page.png"
    assert browser.save_screenshot(str(screenshot))
    shutil.copy(screenshot, "/tmp/serve_page.png")

    # New chat: the conversation is cleared.
    browser.find_element(By.ID, "new-chat").click()
    assert texts(browser, ".message") == []
    assert console_errors(browser) == []


def test_page_asks_for_the_api_key(start_server, browser) -> None:
    url = start_server("--api-key", API_KEY)
    browser.get(f"{url}/")
    assert not browser.find_element(By.ID, "api-key").is_displayed()
    set_field(browser, "#max-tokens", "3")
    browser.find_element(By.ID, "input").send_keys("What is AI?", Keys.ENTER)
    wait_idle(browser)
    # A 401: the server's message and a request for the key; the question comes back.
    error = browser.find_element(By.ID, "error").text
    assert "API key" in error
    assert browser.find_element(By.ID, "api-key").is_displayed()
    assert texts(browser, ".message") == []
    assert browser.find_element(By.ID, "input").get_attribute("value") == "What is AI?"

    set_field(browser, "#api-key", API_KEY)
    browser.find_element(By.ID, "send").click()
    wait_idle(browser)
    assert browser.find_element(By.ID, "error").text == ""
    assert texts(browser, ".message.user") == ["What is AI?"]
    assert len(texts(browser, ".message.assistant")) == 1
    # Only the refused request may show in the console (Chromium logs a failed load).
    assert [m for m in console_errors(browser) if "401" not in m] == []


def test_page_shows_the_servers_error_message(server: str, browser) -> None:
    browser.get(f"{server}/")
    set_field(browser, "#max-tokens", "")
    browser.find_element(By.ID, "input").send_keys("Hello", Keys.ENTER)
    assert browser.find_element(By.ID, "error").text == "Max tokens must be a number"
    # Ranges are the server's to check: its 400 shows as its error object's message.
    body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": -1})
    request = urllib.request.Request(
        f"{server}/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 400
    message = json.loads(refused.value.read())["error"]["message"]
    set_field(browser, "#max-tokens", "-1")
    browser.find_element(By.ID, "send").click()
    wait_idle(browser)
    assert browser.find_element(By.ID, "error").text == message
    # The failed question is not in the conversation; it is back in the input to resend.
    assert texts(browser, ".message") == []
    assert browser.find_element(By.ID, "input").get_attribute("value") == "Hello"
    assert [m for m in console_errors(browser) if "400" not in m] == []
