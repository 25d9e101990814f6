"""The `mla` scenario: is latent attention's decode faster than full multi-head attention of the
same dimensions, since it reads fewer cache bytes?

    python -m nanoinfer.bench.compare --scenarios mla --engines nanoinfer

One attention layer of DeepSeek-V2-Lite's shape (hidden 2048, 16 heads, q/k head dim 128 + 64,
v head dim 128, kv_lora_rank 512), random weights, float32 with a float16 cache: MLA's
`MLAttention` (a 576-value latent row per token) against our ordinary `Attention` with 16 KV
heads of 192 (K and V of every head cached: 6144 values per token), each decoding one token
for 64 sequences of 512 cached tokens. The ordinary layer runs on the C kernels (its default),
MLA in torch ops. Median seconds per decode step of the layer, in rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from nanoinfer.bench.compare import Log, _interleaved

SEQS, CONTEXT, BLOCK = 64, 512, 128


def _configs() -> dict[str, Any]:
    from nanoinfer.config import ModelConfig

    common: dict[str, Any] = dict(vocab_size=1000, hidden_size=2048, intermediate_size=1024, num_layers=1)
    common |= dict(num_heads=16, max_position_embeddings=4096, architecture="deepseek_v2")
    mla = ModelConfig(
        **common, num_kv_heads=1, head_dim=512 + 64, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, attention_scale=192**-0.5, rope_interleave=True,
    )  # fmt: skip
    mha = ModelConfig(**{**common, "architecture": "llama"}, num_kv_heads=16, head_dim=192)
    return {"mla": mla, "mha": mha}


def random_layer(config: Any) -> Any:
    """One attention layer of `config` (MLA or ordinary), weights drawn as transformers does."""
    from nanoinfer.model.layers import Attention
    from nanoinfer.model.mla import MLAttention

    torch.manual_seed(0)
    layer = (MLAttention if config.is_mla else Attention)(config, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    return layer


def layer_inputs(config: Any, chunks: list[Any], num_blocks: int) -> tuple[Any, Any, Any, torch.Tensor]:
    """A float16 paged cache of num_blocks blocks, the step's batch of `chunks`, its RoPE
    tables and random hidden states: (cache, batch, rope, x)."""
    from nanoinfer.model.forward_batch import ForwardBatch
    from nanoinfer.model.kv_cache import PagedKVCache
    from nanoinfer.model.rope import RotaryEmbedding

    kv = PagedKVCache(config, num_blocks, BLOCK, torch.float16)
    batch = ForwardBatch.build(chunks, BLOCK)
    rope = RotaryEmbedding(config.rope_dim, 10000.0, None, 4096)(batch.positions, torch.float32)
    return kv, batch, rope, torch.randn(batch.num_tokens, config.hidden_size)


def _layer_step(config: Any) -> Any:
    """A function running one decode step of one attention layer over a filled cache."""
    from nanoinfer.model.forward_batch import SequenceChunk

    layer = random_layer(config)
    per_seq = -(-(CONTEXT + 1) // BLOCK)
    chunks = [SequenceChunk([1], CONTEXT, list(range(s * per_seq, (s + 1) * per_seq))) for s in range(SEQS)]
    kv, batch, rope, x = layer_inputs(config, chunks, SEQS * per_seq)
    for cache in (*kv.k, *kv.v):
        cache.normal_(0, 1)

    @torch.inference_mode()
    def step() -> float:
        start = time.perf_counter()
        layer(x, rope, batch, kv.k[0], kv.v[0])
        return time.perf_counter() - start

    return step


def run_mla(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """The scenario's figures."""
    from nanoinfer.model.kv_cache import kv_bytes_per_token

    configs = _configs()
    steps = {name: _layer_step(config) for name, config in configs.items()}
    samples = _interleaved(steps, max(args.repeats, 5))
    ms = {name: 1000 * statistics.median(s) for name, s in samples.items()}
    cache_bytes = {name: kv_bytes_per_token(c, torch.float16) for name, c in configs.items()}
    ratio = ms["mha"] / ms["mla"]
    log(
        f"nanoinfer: decode attention {SEQS} x {CONTEXT}: MLA {ms['mla']:.1f} ms, MHA {ms['mha']:.1f} ms ({ratio:.2f}x)"
    )
    return {"step_ms": ms, "cache_bytes_per_token_layer": cache_bytes, "mha_over_mla": ratio, "samples_s": samples}


def mla_markdown(result: dict[str, Any]) -> list[str]:
    """The scenario's table."""
    ms, cache = result["step_ms"], result["cache_bytes_per_token_layer"]
    return [
        "## Multi-head latent attention",
        "",
        f"One attention layer of DeepSeek-V2-Lite's shape decoding one token for {SEQS} sequences of "
        f"{CONTEXT} cached tokens (float16 cache): MLA against full multi-head attention of the same dims.",
        "",
        "| layer | cache bytes per token | ms per decode step |",
        "|---|---:|---:|",
        f"| MLA (latent 512 + rope 64) | {cache['mla']} | {ms['mla']:.1f} |",
        f"| MHA (16 heads, K and V of 192) | {cache['mha']} | {ms['mha']:.1f} |",
        "",
        f"MHA / MLA time: {result['mha_over_mla']:.2f}×",
    ]
