"""Data parallelism: replicas behind one router. Routing by cached prefix then load, answers equal
to one engine's (LLM and server), /metrics per replica and in total, /health with a dead replica,
LoRA admin on every replica, bad input still refused."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import httpx
import openai
import peft
import pytest
import torch
import transformers
from server_utils import running

from nanoinfer import LLM, SamplingParams
from nanoinfer.config import EngineConfig
from nanoinfer.engine.block_allocator import BlockAllocator
from nanoinfer.engine.data_parallel import build_replicas
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.engine.radix_cache import RadixCache
from nanoinfer.server.app import ServerConfig, create_app

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# Small blocks and pages so that prompts of a few dozen tokens fill whole prefix pages.
KNOBS = dict(dtype="float32", max_model_len=128, max_num_seqs=8, block_size=16, prefix_page_size=8)
PROMPTS = [[5 + i, 17, 33, 40, 2 + i, 99, 120 + i, 7] * (1 + i % 3) for i in range(6)]


@pytest.fixture(autouse=True)
def _keep_thread_count() -> Iterator[None]:
    """Replicas set torch's (process-wide) thread count; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tiny_model) -> str:
    path, _ = tiny_model("llama")
    return str(path)


@pytest.fixture(scope="module")
def pair(llama) -> Iterator[tuple[LLM, LLM]]:
    """One engine and two replicas of the same tiny model."""
    threads = torch.get_num_threads()
    one = LLM(llama, **KNOBS)
    two = LLM(llama, data_parallel_size=2, **KNOBS)
    yield one, two
    two.shutdown()
    torch.set_num_threads(threads)


def _hits(engine: LLMEngine) -> int:
    return engine.prefix_cache.hit_tokens


def _routed(llm: LLM) -> list[int]:
    assert llm.replicas is not None
    return list(llm.replicas.num_routed)


# ---- the prefix peek -------------------------------------------------------------------------


def test_cached_prefix_length_matches_without_touching_the_tree():
    cache = RadixCache(BlockAllocator(8), block_size=4, page_size=2)
    blocks = cache.allocator.allocate(3)
    cache.insert(list(range(10)), blocks, salt="a")
    clock, stats = cache._clock, (cache.queried_tokens, cache.hit_tokens)
    assert cache.cached_prefix_length([0, 1, 2, 3, 4, 9], "a") == 4
    assert cache.cached_prefix_length(list(range(12)), "a") == 10
    assert cache.cached_prefix_length(list(range(10)), None) == 0  # another namespace
    assert cache.cached_prefix_length([0, 1, 2], "a") == 2  # whole pages only
    assert (cache._clock, (cache.queried_tokens, cache.hit_tokens)) == (clock, stats)
    assert cache.match_prefix([0, 1, 2, 3, 4, 9], "a").num_tokens == 4
    cache.check_integrity()


# ---- LLM -----------------------------------------------------------------------------------


def test_two_replicas_answer_as_one_engine(pair):
    one, two = pair
    before = _routed(two)
    want = one.generate(PROMPTS, GREEDY)
    got = two.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]
    spread = [after - b for after, b in zip(_routed(two), before)]
    assert spread == [3, 3], "unrelated prompts sent at once spread by load"
    streamed = list(two.stream(PROMPTS[0], GREEDY))
    assert streamed[-1].finished and streamed[-1].token_ids == want[0].token_ids


def test_a_shared_prefix_goes_to_the_replica_that_cached_it(pair):
    _, two = pair
    assert two.replicas is not None
    x, y = list(range(100, 140)), list(range(200, 240))
    two.generate([x, y], GREEDY)  # together: one each, by load
    for prompt in (x, y):
        for i, engine in enumerate(two.engines):
            expect = 40 if i == two.replicas.route(prompt) else 0  # only one replica holds it
            assert engine.prefix_cache.cached_prefix_length(prompt) == expect
    holder_of_y = two.replicas.route(y)
    hits = [_hits(e) for e in two.engines]
    before = _routed(two)
    # One at a time (both replicas idle): the cache decides, not the replica order.
    out = two.generate([y + [9, 9, 9]], GREEDY)[0]
    assert out.num_cached_tokens == 40
    assert [after - b for after, b in zip(_routed(two), before)] == [int(i == holder_of_y) for i in range(2)]
    assert _hits(two.engines[holder_of_y]) - hits[holder_of_y] == 40
    # A replica far busier than the other is not chosen for its cache.
    replica = two.replicas.replicas[holder_of_y]
    replica._outstanding += two.replicas.max_imbalance + 1
    try:
        assert two.replicas.route(y + [1, 2, 3]) != holder_of_y
    finally:
        replica._outstanding -= two.replicas.max_imbalance + 1
    two.replicas.call_each(lambda e: e.check_integrity()).result(10)


def test_replicas_share_one_package_and_refuse_what_cannot_combine(llama):
    with pytest.raises(ValueError, match="tensor or pipeline"):
        build_replicas(llama, EngineConfig(data_parallel_size=2, tensor_parallel_size=2))
    with pytest.raises(ValueError, match="at least 1"):
        build_replicas(llama, EngineConfig(data_parallel_size=0))


# ---- the server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(llama, tmp_path_factory) -> str:
    """A PEFT adapter of the tiny llama with random B, so it changes the answers."""
    base = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("adapter") / "a0"
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def server(llama):
    threads = torch.get_num_threads()
    config = EngineConfig(data_parallel_size=2, enable_lora=True, max_loras=2, max_lora_rank=8, **KNOBS)
    app = create_app(
        None, ServerConfig(model=llama, served_model_name="base"), loader=lambda: build_replicas(llama, config)
    )
    with running(app) as srv:
        yield srv
    torch.set_num_threads(threads)


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert match, f"{series} not in /metrics"
    return float(match.group(1))


def _wait_idle(srv, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while srv.state.async_engine.num_outstanding_seqs or _value(_metrics(srv.url), "nanoinfer:kv_cache_blocks_used"):
        assert time.monotonic() < deadline, "not idle"
        time.sleep(0.05)
    srv.state.async_engine.call_each(lambda e: e.check_integrity()).result(10)


def test_server_answers_as_one_engine_and_reports_every_replica(server, pair):
    one, _ = pair
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    want = one.generate(PROMPTS, GREEDY)

    async def ask_all() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        replies = await asyncio.gather(
            *[
                aclient.completions.create(
                    model="base", prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
                )
                for p in PROMPTS
            ]
        )
        return [r.choices[0].text for r in replies]

    assert asyncio.run(ask_all()) == [o.outputs[0].text for o in want]
    stream = client.completions.create(model="base", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want[1].outputs[0].text
    _wait_idle(server)
    text = _metrics(server.url)
    per_replica = [_value(text, f'nanoinfer:generation_tokens_total{{replica="{i}"}}') for i in range(2)]
    assert all(per_replica) and _value(text, "nanoinfer:generation_tokens_total") == sum(per_replica)
    assert _value(text, "nanoinfer:kv_cache_blocks_total") == 2 * _value(
        text, 'nanoinfer:kv_cache_blocks_total{replica="1"}'
    )
    count = [_value(text, f'nanoinfer:e2e_request_latency_seconds_count{{replica="{i}"}}') for i in range(2)]
    assert _value(text, "nanoinfer:e2e_request_latency_seconds_count") == sum(count) == len(PROMPTS) + 1
    assert 'nanoinfer:e2e_request_latency_seconds_bucket{le="+Inf",replica="0"}' in text
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_server_refuses_bad_input_with_two_replicas(server):
    base = f"{server.url}/v1"
    too_long = httpx.post(f"{base}/completions", json={"model": "base", "prompt": [5] * 200, "max_tokens": 4})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt"
    bad_tokens = httpx.post(f"{base}/completions", json={"model": "base", "prompt": "hi", "max_tokens": -1})
    assert bad_tokens.status_code == 400
    unknown = httpx.post(f"{base}/completions", json={"model": "nope", "prompt": "hi", "max_tokens": 2})
    assert unknown.status_code == 404
    broken = httpx.post(f"{base}/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert 400 <= broken.status_code < 500
    _wait_idle(server)


def test_lora_admin_reaches_every_replica(server, adapter):
    engines = server.state.engines
    load = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "a0", "lora_path": adapter})
    assert load.status_code == 200, load.text
    assert all([r.lora_name for r in e.list_loras()] == ["a0"] for e in engines)
    reference = LLM(engines[0].source, enable_lora=True, max_loras=2, max_lora_rank=8, **KNOBS)
    lora = server.state.loras["a0"]
    want = reference.generate(PROMPTS[:4], GREEDY, lora_request=lora)
    body = {"model": "a0", "prompt": PROMPTS[:4], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in sorted(reply["choices"], key=lambda c: c["index"])] == [o.outputs[0].text for o in want]
    bad = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "a9", "lora_path": "/nonexistent"})
    assert bad.status_code == 400
    assert httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "a0"}).status_code == 200
    assert all(e.list_loras() == [] for e in engines)
    _wait_idle(server)


def test_a_dead_replica_fails_health(llama):
    threads = torch.get_num_threads()
    engines = build_replicas(llama, EngineConfig(data_parallel_size=2, **KNOBS))

    def fatal() -> list:
        raise SystemExit("simulated fatal error")  # not an Exception: it ends the loop

    engines[1].step = fatal  # type: ignore[method-assign]
    app = create_app(engines, ServerConfig(model=llama, served_model_name="base"))
    try:
        with running(app) as srv:
            assert httpx.get(f"{srv.url}/health").status_code == 200
            body = {"model": "base", "prompt": PROMPTS[:2], "max_tokens": 4, "temperature": 0}
            r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)  # one prompt each: one dies
            assert r.status_code == 503
            health = httpx.get(f"{srv.url}/health")
            assert health.status_code == 503 and "replica 1" in health.json()["error"]
            again = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)
            assert again.status_code == 503 and "replica 1" in again.json()["error"]["message"]
    finally:
        torch.set_num_threads(threads)
