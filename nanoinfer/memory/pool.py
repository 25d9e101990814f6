"""The engine's KV pool, sized by the same function the planner uses."""

from __future__ import annotations

import torch

from nanoinfer.config import EngineConfig, ModelConfig
from nanoinfer.model.kv_cache import kv_bytes_per_token

# With neither --kv-cache-memory nor --max-model-len given, the pool is capped here: the model's
# full window x 64 sequences can be tens of GiB.
DEFAULT_KV_CAP_BYTES = 2 << 30

# ---- the KV pool ----------------------------------------------------------------------------------


def kv_pool_bytes(config: ModelConfig, dtype: torch.dtype, engine: EngineConfig, max_model_len: int) -> int:
    """Bytes of the paged KV pool the engine allocates for `config` (a rank's shard config where the
    model is split): `engine.kv_cache_memory` when given, else room for max_model_len x
    max_num_seqs tokens, at most DEFAULT_KV_CAP_BYTES when no max_model_len was asked for; rounded
    down to whole blocks, as PagedKVCache.for_memory allocates them. ValueError when not even one
    block fits."""
    per_token = kv_bytes_per_token(config, dtype)
    memory = engine.kv_cache_memory
    if memory is None:
        memory = per_token * max_model_len * engine.max_num_seqs
        if engine.max_model_len is None:
            memory = min(memory, DEFAULT_KV_CAP_BYTES)
    per_block = per_token * engine.block_size
    if memory < per_block:
        raise ValueError(
            f"KV cache memory {memory} bytes is less than one block ({per_block} bytes for {engine.block_size} tokens)"
        )
    return memory // per_block * per_block


def engine_max_model_len(config: ModelConfig, engine: EngineConfig) -> int:
    """The context window the engine serves (LLMEngine.max_model_len before the pool is made)."""
    return min(engine.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
