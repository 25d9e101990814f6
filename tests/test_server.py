"""The OpenAI-compatible server on SmolLM2, in-process: the official client, raw HTTP, errors, aborts."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from server_utils import free_socket

from nanoinfer.config import EngineConfig
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.server.app import ServerConfig, ServerState, create_app

MODEL = "smollm2-135m-instruct"
SERVED = "smol"
KEY = "test-key"
MAX_MODEL_LEN = 512
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Name three colors."}]


@dataclass
class Running:
    url: str
    state: ServerState
    status_while_loading: int


@pytest.fixture(scope="module")
def server():
    """The app on a real port; the model loads behind a gate so /health is seen answering 503 first."""
    gate = threading.Event()

    def loader() -> LLMEngine:
        gate.wait(60)
        # float32 weights: int4's numerics depend on batch shape (int8-rounded activations at <= 16
        # rows, a dense float copy above), so a prefix-cache hit could change a greedy reply, and
        # these tests compare replies across requests.
        return LLMEngine(MODEL, EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=8, quantization="none"))

    app = create_app(None, ServerConfig(model=MODEL, served_model_name=SERVED, api_key=KEY), loader=loader)
    sock = free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    status_while_loading = httpx.get(f"{url}/health").status_code
    gate.set()
    deadline = time.monotonic() + 180
    while httpx.get(f"{url}/health").status_code != 200:
        assert app.state.server.load_error is None, app.state.server.load_error
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.1)
    yield Running(url, app.state.server, status_while_loading)
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(server: Running, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(
        f"{server.url}{path}",
        content=raw,
        timeout=60,
        headers={"Content-Type": "application/json", **AUTH, **(headers or {})},
    )


def _metric(server: Running, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def _engine_is_idle(server: Running, timeout: float = 2.0) -> None:
    """Within `timeout`: nothing running, no block held by a request, every block accounted for."""
    deadline = time.monotonic() + timeout
    while True:
        running = _metric(server, "nanoinfer:num_requests_running")
        used = _metric(server, "nanoinfer:kv_cache_blocks_used")
        if running == 0 and used == 0:
            break
        assert time.monotonic() < deadline, f"still running={running} blocks_used={used}"
        time.sleep(0.05)
    state = server.state
    state.async_engine.call(state.engine.check_integrity).result(timeout=10)


# ---- plumbing -------------------------------------------------------------------------------


def test_health_models_and_auth(server, client):
    assert server.status_while_loading == 503
    assert httpx.get(f"{server.url}/health").status_code == 200  # open without a key
    assert [m.id for m in client.models.list().data] == [SERVED]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=SERVED, messages=HELLO, max_tokens=2)


def test_tokenize_detokenize(server):
    r = _post(server, "/tokenize", {"prompt": "Hello world, how are you?"})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == MAX_MODEL_LEN
    assert _post(server, "/detokenize", {"tokens": body["tokens"]}).json()["prompt"] == "Hello world, how are you?"
    chat = _post(server, "/tokenize", {"messages": HELLO}).json()
    assert chat["count"] > body["count"]
    assert _post(server, "/detokenize", {"tokens": [10**9]}).status_code == 400
    assert _post(server, "/tokenize", {}).status_code == 400


def test_metrics_names(server):
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "kv_cache_blocks_used",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_bucket",
        "e2e_request_latency_seconds",
    ):
        assert f"nanoinfer:{name}" in r.text


# ---- generation -----------------------------------------------------------------------------


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model=SERVED, messages=HELLO, temperature=0, max_tokens=8)
    full = client.chat.completions.create(**kwargs)
    assert full.choices[0].finish_reason in ("stop", "length") and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == [
        full.choices[0].finish_reason
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    plain = list(client.chat.completions.create(**kwargs, max_completion_tokens=4, stream=True))
    assert all(c.usage is None and c.choices for c in plain)  # no usage chunk unless asked for


def test_stream_opens_with_the_first_token_not_before():
    """The chat role chunk (and a completion's echo) go out with the first output, as vLLM sends
    them: clients such as `vllm bench serve` time the first chunk as the first token."""
    import asyncio

    from nanoinfer.outputs import CompletionOutput, RequestOutput
    from nanoinfer.server.convert import Job
    from nanoinfer.server.streaming import chat_stream, completion_stream

    produced: list[int] = []

    async def outputs():
        produced.append(1)  # the engine's first output exists from here on
        yield 0, RequestOutput("r", [1, 2], [CompletionOutput(0, "Hi", [5], "stop")], finished=True)

    async def first_event(stream) -> str:
        async for event in stream:
            assert produced, "a chunk went out before the first token existed"
            return event
        raise AssertionError("no events")

    job = Job("j", "m", [[1, 2]], [None], n=1, stream=True, include_usage=False)  # type: ignore[list-item]
    texts = None  # no logprobs asked for: never read
    assert '"role":"assistant"' in asyncio.run(first_event(chat_stream(job, outputs(), texts, None)))
    produced.clear()
    assert '"text":"echo"' in asyncio.run(first_event(completion_stream(job, outputs(), texts, ["echo"], False)))


def test_completions_stream_equals_non_stream(client):
    kwargs = dict(model=SERVED, prompt="The capital of France is", temperature=0, max_tokens=6)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [full.choices[0].finish_reason]
    echoed = client.completions.create(**{**kwargs, "max_tokens": 2}, echo=True).choices[0].text
    prompt = kwargs["prompt"]
    assert echoed.startswith(prompt) and full.choices[0].text.startswith(echoed[len(prompt) :])
    ids = client.completions.create(**{**kwargs, "max_tokens": 1, "prompt": [[1, 504, 3575], [1, 504]]})  # a batch
    assert [c.index for c in ids.choices] == [0, 1]


def test_raw_sse_framing(server):
    body = {"prompt": "Hello", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 2
    assert all("usage" not in p for p in payloads[:-1])


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=SERVED, messages=HELLO, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        values = [t.logprob for t in item.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert item.token == item.top_logprobs[0].token  # greedy picks the most likely token
        assert item.logprob <= 0 and bytes(item.bytes).decode("utf-8", "replace") == item.token


def test_completion_logprobs(client):
    r = client.completions.create(model=SERVED, prompt="One, two, three,", temperature=0, max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(top) in (2, 3) for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    if r.choices[0].text.isascii():
        assert "".join(lp.tokens) == r.choices[0].text


def test_n2_and_seed(client):
    """n=2 streams interleave by index, one finish each; the same seed gives the same texts at temperature 1."""
    kwargs = dict(model=SERVED, messages=HELLO, temperature=1.0, max_tokens=6, seed=1234, n=2)
    two = client.chat.completions.create(**kwargs)
    assert [c.index for c in two.choices] == [0, 1]
    finishes: dict[int, list[str]] = {0: [], 1: []}
    texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    assert all(len(f) == 1 for f in finishes.values())
    assert texts == {c.index: c.message.content for c in two.choices}


def test_stop_string(client):
    kwargs = dict(
        model=SERVED, prompt="Once upon a time", temperature=0, max_tokens=10, extra_body={"ignore_eos": True}
    )
    text = client.completions.create(**kwargs).choices[0].text
    words = text.split()
    stop = next(w for w in words[2:] if len(w) > 2)
    r = client.completions.create(**kwargs, stop=[stop])
    assert stop not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    assert text.startswith(r.choices[0].text)


def test_cached_tokens(client):
    system = "You are a careful assistant. " + " ".join(f"Rule {i}: be kind and brief." for i in range(20))
    usages = []
    for question in ("Hi!", "Hello there!"):
        r = client.chat.completions.create(
            model=SERVED,
            max_tokens=1,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        )
        usages.append(r.usage)
    assert usages[1].prompt_tokens > 100
    assert usages[1].prompt_tokens_details.cached_tokens >= 64


# ---- errors ---------------------------------------------------------------------------------

LONG = "word " * 600
ERRORS = [
    ("/v1/chat/completions", "{not json", 400),
    ("/v1/chat/completions", {"model": SERVED}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400),
    ("/v1/chat/completions", {"messages": "hello"}, 400),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}, 400),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 0}, 400),
    ("/v1/chat/completions", {"messages": HELLO, "n": 0}, 400),
    ("/v1/chat/completions", {"messages": HELLO, "top_p": 5}, 400),
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"abc": 1}}, 400),
    ("/v1/chat/completions", {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, 400),
    ("/v1/chat/completions", {"messages": HELLO, "top_logprobs": 2}, 400),
    ("/v1/chat/completions", {"messages": HELLO, "stream_options": {"include_usage": True}}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": MAX_MODEL_LEN}, 400),
    ("/v1/chat/completions", {"messages": HELLO, "model": "gpt-4"}, 404),
    ("/v1/completions", {"prompt": [10**9]}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400),
    ("/v1/completions", {"prompt": LONG}, 400),
    ("/v1/completions", {"prompt": "hi", "model": "nope"}, 404),
]


def test_errors_do_not_disturb_others(server, client):
    """Every malformed request gets an OpenAI error body while a good stream carries on beside them."""
    result: dict[str, Any] = {}

    def good() -> None:
        stream = client.chat.completions.create(
            model=SERVED, messages=HELLO, temperature=0, max_tokens=6, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = list(stream)
        result["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]

    worker = threading.Thread(target=good)
    worker.start()
    for path, body, status in ERRORS:
        r = _post(server, path, body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    context = _post(server, "/v1/completions", {"prompt": LONG}).json()["error"]["message"]
    assert str(MAX_MODEL_LEN) in context and re.search(r"\d{3,} tokens", context)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=SERVED, messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=2)
    worker.join(60)
    assert result["finish"] == ["length"]
    _engine_is_idle(server)


# ---- disconnects ----------------------------------------------------------------------------


def test_stream_disconnect_aborts(server):
    body = {"messages": HELLO, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events == 3:  # the role chunk and two with tokens
                    break
    _engine_is_idle(server)


def test_non_stream_disconnect_aborts(server):
    body = {"messages": HELLO, "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=0.5)
    _engine_is_idle(server)
