"""Data parallelism: D engine replicas in this process behind one router.

Each replica is a whole LLMEngine (its own model copy, KV pool, prefix cache and scheduler) driven
by its own AsyncEngine loop thread. The replicas run at the same time because torch's ops and our
C kernels (ctypes) release the GIL; each replica thread gets cores / D threads, so they do not
oversubscribe the cores.

`DataParallelEngine` has the AsyncEngine interface the server and `LLM` use. It sends each
request to the replica whose prefix cache holds the longest prefix of the prompt (in the
request's cache_salt namespace), then, on ties, to the replica with the fewest outstanding
sequences. A replica more than `max_imbalance` sequences busier than the least loaded one is not
chosen for its cache: otherwise a prefix every request shares (a system prompt) would draw all
traffic to the replica that cached it first.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from nanoinfer.adapters.serving import LoRARequest
from nanoinfer.config import EngineConfig
from nanoinfer.engine.async_engine import AsyncEngine
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.errors import EngineDeadError, EngineOverloadedError
from nanoinfer.loading import ModelPackage, load_package
from nanoinfer.outputs import RequestOutput
from nanoinfer.sampling_params import SamplingParams


def threads_per_replica(num_replicas: int) -> int:
    """The cores shared out among the replicas' loop threads."""
    return max(1, (os.cpu_count() or 1) // num_replicas)


def replica_config(config: EngineConfig) -> EngineConfig:
    """What each replica is built with: the same knobs, one replica."""
    return dataclasses.replace(config, data_parallel_size=1)


def build_replicas(model: str | ModelPackage, config: EngineConfig) -> list[LLMEngine]:
    """`config.data_parallel_size` engines of `model`, each sized as one engine would be (its own
    KV pool of the configured size). The package is loaded once and shared, except with
    merge_lora, which changes a package's weights in place. Sets torch's thread count to
    cores / D (process-wide)."""
    size = config.data_parallel_size
    if size < 1:
        raise ValueError(f"data_parallel_size must be at least 1, got {size}")
    if config.tensor_parallel_size > 1 or config.pipeline_parallel_size > 1:
        raise ValueError("data_parallel_size > 1 cannot be combined with tensor or pipeline parallelism yet")
    if config.merge_lora is not None and isinstance(model, ModelPackage):
        # merge_lora adds the adapter into the package's weights in place: a shared package
        # would get it once per replica.
        raise ValueError("merge_lora with data_parallel_size > 1 needs a model name or path, not a loaded package")
    torch.set_num_threads(threads_per_replica(size))
    source: str | ModelPackage = model
    if config.merge_lora is None and not isinstance(model, ModelPackage):
        source = load_package(model)  # once for all: each model copies its weights out of it
    one = replica_config(config)
    replicas: list[LLMEngine] = []
    try:
        for _ in range(size):
            replicas.append(LLMEngine(source, one))
    except BaseException:
        for engine in replicas:
            engine.shutdown()
        raise
    return replicas


def lora_cache_salt(cache_salt: str | None, lora_request: LoRARequest | None) -> str | None:
    """The prefix-cache namespace a request's K/V lives in: LLMEngine.add_request keeps each
    adapter's K/V apart by joining its id to the salt, and the router must look there too."""
    if lora_request is None:
        return cache_salt
    return f"{cache_salt or ''}\x1flora:{lora_request.lora_int_id}"


class DataParallelEngine:
    """D AsyncEngine replicas behind the AsyncEngine interface, with cache-aware routing.

    Healthy only while every replica's loop is: a dead replica makes `health()` and
    `check_capacity` fail, so the server stops taking requests instead of serving at half
    capacity without saying so."""

    def __init__(self, replicas: Sequence[AsyncEngine], max_imbalance: int | None = None):
        if not replicas:
            raise ValueError("a DataParallelEngine needs at least one replica")
        self.replicas = list(replicas)
        self.engines = [r.engine for r in self.replicas]
        self.max_imbalance = (
            max(1, self.engines[0].config.max_num_seqs // 4) if max_imbalance is None else max_imbalance
        )
        self.num_routed = [0] * len(self.replicas)  # requests sent to each replica

    @classmethod
    def start(
        cls, engines: Sequence[LLMEngine], max_outstanding_seqs: int | None = None, **async_kwargs: Any
    ) -> DataParallelEngine:
        """Start a loop thread per engine; `max_outstanding_seqs` bounds each replica."""
        threads = threads_per_replica(len(engines))
        replicas = [AsyncEngine(e, max_outstanding_seqs=max_outstanding_seqs, **async_kwargs) for e in engines]
        for replica in replicas:
            # On the replica's own thread: torch keeps an OpenMP thread count per thread, and our
            # C kernels run with the count of the thread that calls them.
            replica.call(partial(torch.set_num_threads, threads))
        return cls(replicas)

    @property
    def engine(self) -> LLMEngine:
        """Replica 0's engine: what callers read the tokenizer, configs and limits from (the
        same in every replica)."""
        return self.engines[0]

    # ---- routing ----------------------------------------------------------------------------

    def route(
        self,
        prompt_ids: Sequence[int],
        num_seqs: int = 1,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> int:
        """The replica for a request: the longest cached prefix among replicas that have room and
        are at most `max_imbalance` sequences busier than the least loaded one, then the fewest
        outstanding sequences. Raises EngineDeadError or EngineOverloadedError."""
        self._check_alive()
        loads = [r.num_outstanding_seqs for r in self.replicas]
        room = [i for i, r in enumerate(self.replicas) if _has_room(r, loads[i], num_seqs)]
        if not room:
            raise self._overloaded(num_seqs)
        least = min(loads[i] for i in room)
        near = [i for i in room if loads[i] <= least + self.max_imbalance]
        salt = lora_cache_salt(cache_salt, lora_request)
        # The engine matches prompt[:-1]: the last prompt token is always computed.
        head = prompt_ids[:-1]
        cached = {i: self.engines[i].prefix_cache.cached_prefix_length(head, salt) for i in near}
        return min(near, key=lambda i: (-cached[i], loads[i], i))

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """AsyncEngine.generate on the replica `route` picks; leaving early aborts the request there."""
        ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        index = self.route(ids, params.n, cache_salt, lora_request)
        self.num_routed[index] += 1
        # No await between routing and the replica counting the request as outstanding, so
        # requests arriving together see each other's load.
        stream = self.replicas[index].generate(request_id, ids, params, cache_salt, lora_request)
        async with contextlib.aclosing(stream):
            async for out in stream:
                yield out

    # ---- the rest of the AsyncEngine interface ---------------------------------------------

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on replica 0's thread, the one that owns `self.engine`."""
        return self.replicas[0].call(fn)

    def call_each(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on every replica's thread; the future holds their results in replica
        order, or the first replica's exception once all have finished."""
        return _gather([r.call_each(fn) for r in self.replicas])

    def health(self) -> str | None:
        """None while every replica's loop is alive and coming round; else which one and why."""
        for i, replica in enumerate(self.replicas):
            why = replica.health()
            if why is not None:
                return f"replica {i}: {why}"
        return None

    @property
    def num_outstanding_seqs(self) -> int:
        return sum(r.num_outstanding_seqs for r in self.replicas)

    def check_capacity(self, num_seqs: int) -> None:
        """Raise EngineDeadError or EngineOverloadedError unless `num_seqs` more sequences fit
        in the replicas together (each prompt is routed, and checked, on its own)."""
        self._check_alive()
        free = 0
        for replica in self.replicas:
            limit = replica.max_outstanding_seqs
            if limit is None:
                return
            free += max(limit - replica.num_outstanding_seqs, 0)
        if num_seqs > free:
            raise self._overloaded(num_seqs)

    def abort_all(self, reason: str) -> concurrent.futures.Future:
        return _gather([r.abort_all(reason) for r in self.replicas])

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.shutdown()

    def _check_alive(self) -> None:
        for i, replica in enumerate(self.replicas):
            if replica.dead is not None:
                raise EngineDeadError(f"replica {i}: {replica.dead}")

    def _overloaded(self, num_seqs: int) -> EngineOverloadedError:
        limits = [r.max_outstanding_seqs or 0 for r in self.replicas]
        return EngineOverloadedError(
            f"the server is busy: {self.num_outstanding_seqs} sequences are running or waiting over "
            f"{len(self.replicas)} replicas (limit {sum(limits)}, {num_seqs} more asked for); retry later"
        )


def _has_room(replica: AsyncEngine, load: int, num_seqs: int) -> bool:
    limit = replica.max_outstanding_seqs
    return limit is None or load + num_seqs <= limit


def _gather(futures: list[concurrent.futures.Future]) -> concurrent.futures.Future:
    """One future for several: their results in order once all are done, or the first exception."""
    combined: concurrent.futures.Future = concurrent.futures.Future()
    remaining = [len(futures)]
    lock = threading.Lock()  # the callbacks run on the replicas' threads

    def done(_: concurrent.futures.Future) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        for f in futures:
            if f.cancelled():
                combined.cancel()
                return
            if f.exception() is not None:
                combined.set_exception(f.exception())
                return
        combined.set_result([f.result() for f in futures])

    if not futures:
        combined.set_result([])
    for f in futures:
        f.add_done_callback(done)
    return combined


# ---- /metrics ----------------------------------------------------------------------------------


class ReplicaMetrics:
    """Every replica's metrics as one set of families: each series once per replica with a
    `replica` label, and once without it for all replicas together (counters, gauges and
    histogram buckets summed; `_created` the earliest; a `_perc` gauge averaged). Series without
    the label are what one engine reports, so dashboards of a single engine keep working."""

    def __init__(self, engines: Sequence[LLMEngine]) -> None:
        self.engines = list(engines)

    def collect(self) -> Iterator[Metric]:
        parts: dict[str, list[tuple[int, Metric]]] = {}
        for i, engine in enumerate(self.engines):
            for family in engine.metrics.registry.collect():
                parts.setdefault(family.name, []).append((i, family))
        for name, families in parts.items():
            yield _merged_family(name, families, len(self.engines))


def _merged_family(name: str, families: list[tuple[int, Metric]], num_replicas: int) -> Metric:
    first = families[0][1]
    merged = Metric(name, first.documentation, first.type, first.unit)
    totals: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}
    for _, family in families:
        for s in family.samples:
            totals.setdefault((s.name, tuple(sorted(s.labels.items()))), []).append(s.value)
    for (sample, labels), values in totals.items():
        merged.add_sample(sample, dict(labels), _total(sample, first.type, values, num_replicas))
    for i, family in families:
        for s in family.samples:
            merged.add_sample(s.name, {**s.labels, "replica": str(i)}, s.value)
    return merged


def _total(sample: str, kind: str, values: list[float], num_replicas: int) -> float:
    if sample.endswith("_created"):
        return min(values)  # when the first replica started counting
    if kind == "gauge" and sample.endswith("_perc"):
        return sum(values) / num_replicas  # a fraction of equal pools: the mean is the whole's
    return sum(values)


def render_metrics(engines: Sequence[LLMEngine]) -> bytes:
    """The Prometheus text of one engine as it always was, or of several per replica and in total."""
    if len(engines) == 1:
        return generate_latest(engines[0].metrics.registry)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicaMetrics(engines))
    return generate_latest(registry)
