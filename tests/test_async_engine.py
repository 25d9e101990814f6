"""AsyncEngine on a tiny model: the loop survives cancelled futures, failing steps and failing
requests; a dead loop is reported and refuses work; slow readers and full queues are bounded."""

from __future__ import annotations

import asyncio
import time

import pytest

from nanoinfer.config import EngineConfig
from nanoinfer.engine.async_engine import AsyncEngine, RequestFailedError
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.errors import EngineDeadError, EngineOverloadedError
from nanoinfer.sampling_params import RequestOutputKind, SamplingParams

PROMPT = [5, 17, 42, 99, 7, 13]


def _params(max_tokens: int = 8, kind: RequestOutputKind = RequestOutputKind.DELTA) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind=kind)


@pytest.fixture
def engine(tiny_model):
    directory, _ = tiny_model("llama")
    return LLMEngine(str(directory), EngineConfig(max_num_seqs=4, max_model_len=256))


@pytest.fixture
def async_engine(engine):
    ae = AsyncEngine(engine)
    yield ae
    ae.shutdown()


async def _collect(ae: AsyncEngine, rid: str, params: SamplingParams | None = None) -> list[int]:
    ids: list[int] = []
    async for out in ae.generate(rid, PROMPT, params or _params()):
        ids += out.outputs[0].token_ids if out.outputs else []
    return ids


def _idle(ae: AsyncEngine) -> None:
    """Nothing left in the engine and every KV block accounted for."""
    deadline = time.monotonic() + 5
    while ae.call(lambda: bool(ae.engine.requests)).result(5):
        assert time.monotonic() < deadline, "requests left in the engine"
        time.sleep(0.02)
    ae.call(ae.engine.check_integrity).result(5)
    assert ae.num_outstanding_seqs == 0


def test_cancelled_futures_do_not_kill_the_loop(async_engine):
    """Requests cancelled while the engine thread is busy (their add futures cancelled) used to
    make set_result raise InvalidStateError and end the thread."""

    async def main() -> list[int]:
        async_engine.call(lambda: time.sleep(0.3))  # keep the thread busy
        tasks = [asyncio.create_task(_collect(async_engine, f"c{i}")) for i in range(12)]
        await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return await asyncio.wait_for(_collect(async_engine, "after"), 30)

    assert len(asyncio.run(main())) == 8
    assert async_engine.health() is None
    _idle(async_engine)


def test_failing_step_fails_its_requests_and_the_loop_goes_on(async_engine, monkeypatch):
    real = async_engine.engine.runner.execute
    calls = {"n": 0}

    def flaky(chunks):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated kernel failure")
        return real(chunks)

    monkeypatch.setattr(async_engine.engine.runner, "execute", flaky)

    async def main() -> None:
        with pytest.raises(RequestFailedError, match="simulated kernel failure"):
            await asyncio.wait_for(_collect(async_engine, "a"), 30)
        assert len(await asyncio.wait_for(_collect(async_engine, "b"), 30)) == 8

    asyncio.run(main())
    assert async_engine.health() is None
    _idle(async_engine)


def test_failing_request_fails_alone(async_engine, monkeypatch):
    """An exception in one request's postprocessing (here its detokenizer) fails that request only."""
    engine = async_engine.engine
    original = engine._new_sequence

    def new_sequence(request_id, *args, **kwargs):
        seq = original(request_id, *args, **kwargs)
        if request_id == "bad":

            def broken(token_id):
                raise UnicodeError("simulated detokenizer bug")

            seq.detokenizer.add = broken
        return seq

    monkeypatch.setattr(engine, "_new_sequence", new_sequence)

    async def main() -> tuple[object, object]:
        return await asyncio.gather(
            _collect(async_engine, "bad", _params(16)),
            _collect(async_engine, "good", _params(16)),
            return_exceptions=True,
        )

    bad, good = asyncio.run(main())
    assert isinstance(bad, RequestFailedError) and "simulated detokenizer bug" in str(bad)
    assert isinstance(good, list) and len(good) == 16
    _idle(async_engine)


def test_dead_loop_is_reported_and_refuses_work(async_engine):
    async def main() -> None:
        waiting = asyncio.create_task(_collect(async_engine, "w", _params(10_000 // 50)))
        await asyncio.sleep(0.05)

        def die() -> None:
            raise SystemExit("simulated fatal error")  # not an Exception: passes every handler

        async_engine.call(die)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(waiting, 10)
        with pytest.raises(EngineDeadError):
            await _collect(async_engine, "new")

    asyncio.run(main())
    assert "simulated fatal error" in (async_engine.health() or "")
    with pytest.raises(EngineDeadError):
        async_engine.call(lambda: None).result(1)


def test_stalled_loop_is_unhealthy(engine):
    ae = AsyncEngine(engine, stall_seconds=0.2)
    try:
        ae.call(lambda: time.sleep(0.6))
        time.sleep(0.4)
        assert "no progress" in (ae.health() or "")
        time.sleep(0.5)
        assert ae.health() is None
    finally:
        ae.shutdown()


def test_reader_that_stops_reading_is_aborted(engine):
    ae = AsyncEngine(engine, max_pending_outputs=3)

    async def main() -> None:
        stream = ae.generate("slow", PROMPT, _params(200))
        await stream.__anext__()  # read one output, then nothing while the engine decodes
        await asyncio.sleep(1.0)
        with pytest.raises(RequestFailedError, match="read nothing"):
            while True:
                await stream.__anext__()

    try:
        asyncio.run(main())
        _idle(ae)
    finally:
        ae.shutdown()


def test_capacity_bounds_outstanding_sequences(engine):
    ae = AsyncEngine(engine, max_outstanding_seqs=2)

    async def main() -> None:
        first = ae.generate("a", PROMPT, _params(200))
        second = ae.generate("b", PROMPT, _params(200))
        await first.__anext__()
        await second.__anext__()
        with pytest.raises(EngineOverloadedError, match="busy"):
            await ae.generate("c", PROMPT, _params()).__anext__()
        await first.aclose()
        await second.aclose()
        assert len(await _collect(ae, "d")) == 8  # room again

    try:
        asyncio.run(main())
        _idle(ae)
    finally:
        ae.shutdown()


def test_delta_outputs_join_to_the_cumulative_ones(engine):
    """DELTA hands out only what is new (no quadratic copies); joined, it equals CUMULATIVE."""
    ae = AsyncEngine(engine)

    async def run(kind: RequestOutputKind) -> list:
        return [
            out
            async for out in ae.generate(
                f"r-{kind.value}",
                PROMPT,
                SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, output_kind=kind),
            )
        ]

    try:
        deltas = asyncio.run(run(RequestOutputKind.DELTA))
        whole = asyncio.run(run(RequestOutputKind.CUMULATIVE))[-1].outputs[0]
        final_only = asyncio.run(run(RequestOutputKind.FINAL_ONLY))
    finally:
        ae.shutdown()
    assert [len(o.outputs[0].token_ids) for o in deltas] == [1] * 12
    assert sum((o.outputs[0].token_ids for o in deltas), []) == whole.token_ids
    assert "".join(o.outputs[0].text for o in deltas) == whole.text
    assert sum((o.outputs[0].logprobs for o in deltas), []) == whole.logprobs
    assert [o.outputs[0].finish_reason for o in deltas][-1] == "length"
    assert len(final_only) == 1 and final_only[0].outputs[0].token_ids == whole.token_ids


def test_server_stream_that_stops_being_read_is_aborted(engine):
    """Through the server's merged stream too: a reader that stops reading stops the pumps, the
    engine's queue for the request fills, and the request is aborted with its KV freed."""
    from nanoinfer.server.convert import Job
    from nanoinfer.server.streaming import merged_outputs

    ae = AsyncEngine(engine, max_pending_outputs=32)  # roomy enough that a reading pump never overflows
    job = Job("job", "m", [PROMPT], [_params(200)], n=1, stream=True, include_usage=False)

    async def main() -> None:
        stream = merged_outputs(ae, job)
        await stream.__anext__()  # one output, then nothing while the engine decodes
        deadline = time.monotonic() + 20
        while await asyncio.wrap_future(ae.call(lambda: bool(ae.engine.requests))):  # without blocking the loop
            assert time.monotonic() < deadline, "the unread request was never aborted"
            await asyncio.sleep(0.05)
        await stream.aclose()

    try:
        asyncio.run(main())
        _idle(ae)
    finally:
        ae.shutdown()
    generated = engine.metrics.registry.get_sample_value("nanoinfer:generation_tokens_total")
    assert generated < 100, f"{generated} tokens generated for a reader that stopped after one"
