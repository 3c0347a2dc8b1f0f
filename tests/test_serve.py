"""`nexus serve`: the OpenAI-compatible completions server, tested on loopback through the
official `openai` client, raw HTTP and a headless browser on its playground."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from nexus.checkpoint import model_state_for_saving, save_checkpoint
from nexus.cli import load_model_for_use, main
from nexus.config import TrainConfig, preset
from nexus.generation import as_text, stream
from nexus.model import NexusLM
from nexus.sampling import Sampling

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
serve = pytest.importorskip("nexus.serve")
if not serve.STACK_PRESENT:
    pytest.skip("FastAPI is not installed (pip install 'nexus[serve]')", allow_module_level=True)

PROMPT = "To be"
LIMITS = {"max_active": 8, "max_queue": 32, "max_prompt_bytes": 1024, "max_tokens_limit": 100_000}
# Greedy, and sampled with a seed: the two ways a request is reproducible.
SETTINGS = [
    {"temperature": 0.0, "top_p": 1.0, "seed": 1},
    {"temperature": 0.8, "top_p": 0.9, "seed": 7},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained nexus-tiny model: its bytes are noise, which exercises the replacement of
    bytes that are not UTF-8 as well as any text would."""
    torch.manual_seed(0)
    config = preset("nexus-tiny")
    model = NexusLM(config)
    meta = {"step": 0, "model_config": config.to_dict(), "train_config": TrainConfig().to_dict()}
    path = tmp_path_factory.mktemp("serve") / "tiny.bin"
    save_checkpoint(path, model_state_for_saving(model), {}, meta)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> NexusLM:
    return load_model_for_use(str(checkpoint))[0]


@contextmanager
def serving(model: NexusLM, **limits: int) -> Iterator[str]:
    """The server in a thread of this process, on a free loopback port: its base URL."""
    settings = serve.ServeSettings(model_name="tiny", **{**LIMITS, **limits})
    server = uvicorn.Server(uvicorn.Config(serve.create_app(model, settings), log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the server to start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server(model: NexusLM) -> Iterator[str]:
    with serving(model) as url:
        yield url


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return result


def health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health").json()


def complete(url: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_nexus_serve_gives_the_text_of_nexus_sample_through_the_openai_client(
    checkpoint: Path, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    command = ["serve", str(checkpoint), "--port", "0", "--model_name", "tiny"]
    server = subprocess.Popen(
        [sys.executable, "-m", "nexus", *command],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        expected = []  # while the server starts, what `nexus sample` prints
        for settings in SETTINGS:
            flags = [f"--{name}={value}" for name, value in settings.items()]
            sample = ["sample", str(checkpoint), "--prompt", PROMPT, "--max_new_tokens", "48"]
            assert main(sample + flags) == 0
            text = capsysbinary.readouterr().out.decode()
            assert text.startswith(PROMPT) and text.endswith("\n")
            expected.append(text[len(PROMPT) : -1])

        def address() -> str | None:  # where its socket is bound: loopback by default
            assert server.poll() is None, log_path.read_text()
            found = re.search(r"playground is at (http://127\.0\.0\.1:\d+)/", log_path.read_text())
            return found and found[1]

        url = wait_for(address, "nexus serve to say where it listens", timeout=120)

        def up() -> bool:
            assert server.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, "nexus serve to answer", timeout=120)
        assert health(url) == {"status": "ok", "active": 0, "waiting": 0}
        openai_client = client(url)
        assert [card.id for card in openai_client.models.list()] == ["tiny"]
        for settings, text in zip(SETTINGS, expected, strict=True):
            request = {"model": "tiny", "prompt": PROMPT, "max_tokens": 48, **settings}
            whole = openai_client.completions.create(**request)
            assert whole.object == "text_completion" and whole.model == "tiny"
            assert whole.choices[0].text == text
            assert whole.choices[0].finish_reason == "length"
            assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(PROMPT), 48)
            chunks = list(openai_client.completions.create(**request, stream=True))
            assert "".join(chunk.choices[0].text for chunk in chunks) == text
            assert [chunk.choices[0].finish_reason for chunk in chunks[-2:]] == [None, "length"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert server.returncode == 0, log_path.read_text()  # Ctrl-C is how a server stops


def test_stop_sequences_and_echo(server: str) -> None:
    text = complete(server, max_tokens=64, temperature=0)["choices"][0]["text"]
    # The first printable ASCII character past the start that has not appeared before.
    cut = next(i for i, c in enumerate(text) if i >= 3 and "!" <= c <= "~" and c not in text[:i])
    for stop in (text[cut], [text[cut], "\x00never"]):
        stopped = complete(server, max_tokens=64, temperature=0, stop=stop)
        assert stopped["choices"][0]["text"] == text[:cut]
        assert stopped["choices"][0]["finish_reason"] == "stop"
        assert stopped["usage"]["completion_tokens"] < 64
    chunks = list(
        client(server).completions.create(
            model="tiny", prompt=PROMPT, max_tokens=64, temperature=0, stop=text[cut], stream=True
        )
    )
    assert "".join(chunk.choices[0].text for chunk in chunks) == text[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"
    echoed = complete(server, max_tokens=64, temperature=0, echo=True)["choices"][0]["text"]
    assert echoed == PROMPT + text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"prompt": "To be", "max_tokens": ', None),
        (b"\xff\xfe", None),
        (b'["To be"]', None),
        (b"{}", "prompt"),
        (b'{"prompt": 42}', "prompt"),
        (b'{"prompt": ["To be", "or not"]}', "prompt"),
        (b'{"prompt": "\\ud800"}', "prompt"),
        (json.dumps({"prompt": "x" * 1025}).encode(), "prompt"),
        (b'{"prompt": "To be", "max_tokens": -1}', "max_tokens"),
        (b'{"prompt": "To be", "max_tokens": 0}', "max_tokens"),
        (b'{"prompt": "To be", "max_tokens": 100001}', "max_tokens"),
        (b'{"prompt": "To be", "max_tokens": 1000000000000}', "max_tokens"),
        (b'{"prompt": "To be", "max_tokens": "16"}', "max_tokens"),
        (b'{"prompt": "To be", "max_tokens": 16.5}', "max_tokens"),
        (b'{"prompt": "To be", "max_tokens": true}', "max_tokens"),
        (b'{"prompt": "To be", "temperature": -0.5}', "temperature"),
        (b'{"prompt": "To be", "temperature": NaN}', "temperature"),
        (b'{"prompt": "To be", "temperature": "hot"}', "temperature"),
        (b'{"prompt": "To be", "top_p": 0}', "top_p"),
        (b'{"prompt": "To be", "top_p": 1.5}', "top_p"),
        (b'{"prompt": "To be", "top_k": -2}', "top_k"),
        (b'{"prompt": "To be", "seed": 1.5}', "seed"),
        (b'{"prompt": "To be", "stop": 7}', "stop"),
        (b'{"prompt": "To be", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
        (b'{"prompt": "To be", "stream": "yes"}', "stream"),
        (b'{"prompt": "To be", "n": 2}', "n"),
        (b'{"prompt": "To be", "logprobs": 1}', "logprobs"),
        (b'{"prompt": "To be", "model": 3}', "model"),
    ],
)
def test_a_bad_request_is_a_400_naming_the_field(server: str, body: bytes, param: str) -> None:
    response = httpx.post(
        f"{server}/v1/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)
    assert error["message"]


def test_limits_are_inclusive_and_the_openai_client_sees_the_field(server: str) -> None:
    assert len(complete(server, prompt="x" * 1024, max_tokens=1)["choices"][0]["text"]) == 1
    with pytest.raises(openai.BadRequestError) as raised:
        client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=-5)
    assert raised.value.param == "max_tokens"


def test_a_failed_generation_is_reported_and_the_server_goes_on(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args: Any, **kwargs: Any) -> Iterator[bytes]:
        yield b"ab"
        raise RuntimeError("the decoder broke")

    monkeypatch.setattr(serve, "stream", failing)
    whole = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT})
    assert whole.status_code == 500
    assert "the decoder broke" in whole.json()["error"]["message"]
    body = {"prompt": PROMPT, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body) as streamed:
        events = [line[6:] for line in data_lines(streamed)]
    assert json.loads(events[0])["choices"][0]["text"] == "ab"  # what came before the failure
    assert "the decoder broke" in json.loads(events[1])["error"]["message"]
    assert events[2:] == ["[DONE]"]
    monkeypatch.undo()
    assert complete(server, max_tokens=4)["usage"]["completion_tokens"] == 4


def data_lines(response: Any) -> Iterator[str]:
    return (line for line in response.iter_lines() if line.startswith("data: "))


def test_a_full_server_answers_503_and_a_client_that_leaves_frees_its_place(
    model: NexusLM,
) -> None:
    endless = {"prompt": PROMPT, "max_tokens": 1_000_000, "stream": True}
    with (
        serving(model, max_active=1, max_queue=1, max_tokens_limit=1_000_000) as url,
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        with http.stream("POST", "/v1/completions", json=endless) as first:
            events = data_lines(first)  # kept: closing it would close the connection
            assert json.loads(next(events)[6:])["choices"][0]["text"]
            with http.stream("POST", "/v1/completions", json=endless) as second:
                assert second.status_code == 200  # taken, waiting for the one place
                assert health(url) == {"status": "ok", "active": 1, "waiting": 1}
                refused = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
                assert refused.status_code == 503
                assert int(refused.headers["Retry-After"]) >= 1
                assert refused.json()["error"]["type"] == "server_error"
            # The second client left while waiting, the first mid-stream: both places free.
            wait_for(lambda: health(url)["waiting"] == 0, "the waiting place to free")
        wait_for(lambda: health(url)["active"] == 0, "the streaming place to free")
        # A client of a whole (not streamed) completion that leaves frees its place too.
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:
            body = json.dumps({**endless, "stream": False}).encode()
            head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
            raw.sendall(f"{head}\r\nContent-Type: application/json\r\n\r\n".encode() + body)
            wait_for(lambda: health(url)["active"] == 1, "the request to start")
        wait_for(lambda: health(url)["active"] == 0, "the whole request's place to free")
        assert complete(url, max_tokens=8)["usage"]["completion_tokens"] == 8


def test_32_concurrent_streaming_clients_all_get_their_whole_text(
    server: str, model: NexusLM
) -> None:
    clients, max_tokens = 32, 48
    sampling = Sampling(temperature=0.8)
    prompts = [f"Client {i}: " for i in range(clients)]
    expected = [
        "".join(as_text(stream(model, p.encode(), max_tokens, sampling, seed=i)))
        for i, p in enumerate(prompts)
    ]

    async def one(api: Any, index: int) -> tuple[float, str, str, int]:
        started = time.perf_counter()
        chunks = await api.completions.create(
            model="tiny",
            prompt=prompts[index],
            max_tokens=max_tokens,
            temperature=0.8,
            seed=index,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, used = "", "", 0
        async for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            else:
                used = chunk.usage.completion_tokens
        return time.perf_counter() - started, text, finish, used

    async def load() -> list[tuple[float, str, str, int]]:
        api = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        async with api:
            return await asyncio.gather(*(one(api, i) for i in range(clients)))

    started = time.perf_counter()
    results = asyncio.run(load())
    seconds = time.perf_counter() - started
    assert [text for _, text, _, _ in results] == expected
    assert {(finish, used) for _, _, finish, used in results} == {("length", max_tokens)}
    latencies = sorted(latency for latency, _, _, _ in results)
    p95 = latencies[round(0.95 * (clients - 1))]
    print(
        f"\n{clients} streaming clients x {max_tokens} bytes: p50 latency "
        f"{statistics.median(latencies):.2f} s, p95 {p95:.2f} s, "
        f"{clients * max_tokens / seconds:.0f} bytes/s in all"
    )


def browser() -> tuple[str, str]:
    chromium = next(filter(None, map(shutil.which, ["chromium", "chromium-browser"])), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no headless Chromium: install Debian's chromium and chromium-driver")
    return chromium, driver


def test_the_playground_streams_a_typed_prompt_onto_the_page(server: str) -> None:
    chromium, driver_path = browser()
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By

    max_tokens = 3000
    expected = complete(server, max_tokens=max_tokens, temperature=0)["choices"][0]["text"]
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
    try:
        driver.get(f"{server}/")
        wait_for(lambda: driver.find_element(By.ID, "model").text == "tiny", "the model's name")
        for field, value in (("prompt", PROMPT), ("max_tokens", max_tokens), ("temperature", 0)):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(str(value))
        driver.find_element(By.ID, "generate").click()
        page = "return ['output', 'status'].map((id) => document.getElementById(id).textContent)"
        seen = [driver.execute_script(page)]
        deadline = time.monotonic() + 60
        while not seen[-1][1].startswith(("done", "error")) and time.monotonic() < deadline:
            seen.append(driver.execute_script(page))
        assert seen[-1] == [expected, "done (length)"], seen[-1][1]
        # Text was on the page while the stream went on: it arrived in pieces.
        assert any(0 < len(text) < len(expected) for text, status in seen[:-1])
        assert driver.find_element(By.ID, "prompt-echo").text == PROMPT
    finally:
        driver.quit()


def test_serve_without_its_extra_says_how_to_install_it(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(serve, "STACK_PRESENT", False)
    assert main(["serve", str(checkpoint)]) == 2
    assert "pip install 'nexus[serve]'" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["serve", str(checkpoint), "--max_active", "0"]) == 2
    assert "--max_active must be at least 1" in capsys.readouterr().err
