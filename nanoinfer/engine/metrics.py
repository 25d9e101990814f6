"""Engine metrics, named as vLLM names them (prefix `nanoinfer:`), in a registry of their own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

if TYPE_CHECKING:
    from nanoinfer.model.transformer import Transformer

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)


class EngineMetrics:
    """Counters, gauges and histograms one engine updates; `registry` is what /metrics exposes."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.num_requests_running = Gauge(
            "nanoinfer:num_requests_running", "Sequences in the running batch", registry=r
        )
        self.num_requests_waiting = Gauge(
            "nanoinfer:num_requests_waiting", "Sequences waiting to be scheduled", registry=r
        )
        self.kv_cache_usage_perc = Gauge(
            "nanoinfer:kv_cache_usage_perc", "Fraction of KV blocks not free (0-1)", registry=r
        )
        self.kv_blocks_used = Gauge(
            "nanoinfer:kv_cache_blocks_used", "KV blocks referenced by running requests", registry=r
        )
        self.kv_blocks_cached = Gauge(
            "nanoinfer:kv_cache_blocks_cached", "KV blocks held only by the prefix cache", registry=r
        )
        self.kv_blocks_total = Gauge("nanoinfer:kv_cache_blocks_total", "KV blocks in the pool", registry=r)
        self.prefix_cache_queries = Counter(
            "nanoinfer:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_cache_hits = Counter(
            "nanoinfer:prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r
        )
        self.prompt_tokens = Counter("nanoinfer:prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("nanoinfer:generation_tokens", "Generated tokens", registry=r)
        self.num_preemptions = Counter("nanoinfer:num_preemptions", "Sequences preempted by recompute", registry=r)
        self.ttft = Histogram(
            "nanoinfer:time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "nanoinfer:inter_token_latency_seconds", "Time between tokens", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "nanoinfer:e2e_request_latency_seconds", "Request latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        # Speculative decoding, as vLLM names it: drafts proposed, draft tokens, tokens accepted,
        # and accepted tokens by draft position (position 0 is the first guessed token).
        self.spec_drafts = Counter("nanoinfer:spec_decode_num_drafts", "Drafts verified", registry=r)
        self.spec_draft_tokens = Counter("nanoinfer:spec_decode_num_draft_tokens", "Draft tokens verified", registry=r)
        self.spec_accepted_tokens = Counter(
            "nanoinfer:spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r
        )
        self.spec_accepted_per_pos = Counter(
            "nanoinfer:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by draft position",
            ["position"],
            registry=r,
        )

    def count_drafts(self, num_draft: int, num_accepted: int) -> None:
        """Record one verified draft of `num_draft` tokens, of which the first `num_accepted` were kept."""
        if not num_draft:
            return
        self.spec_drafts.inc()
        self.spec_draft_tokens.inc(num_draft)
        self.spec_accepted_tokens.inc(num_accepted)
        for position in range(num_accepted):
            self.spec_accepted_per_pos.labels(position=str(position)).inc()


class ExpertLoadCollector:
    """`nanoinfer:moe_expert_tokens_total{layer, expert}`: tokens routed to each expert of each
    mixture-of-experts layer since the engine started. Read from the model's own counts when
    /metrics is scraped, so decoding pays nothing for it."""

    def __init__(self, model: Transformer) -> None:
        self.model = model

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "nanoinfer:moe_expert_tokens", "Tokens routed to each expert of each MoE layer", labels=["layer", "expert"]
        )
        for layer, counts in expert_load(self.model).items():
            for expert, tokens in enumerate(counts):
                family.add_metric([str(layer), str(expert)], tokens)
        yield family


def expert_load(model: Transformer) -> dict[int, list[int]]:
    """Tokens routed to each expert, per MoE layer (layer index -> counts), since the last reset."""
    from nanoinfer.model.moe import SparseMoE

    return {
        i: layer.mlp.expert_tokens.tolist()
        for i, layer in enumerate(model.decoder_layers)
        if isinstance(layer.mlp, SparseMoE)
    }
