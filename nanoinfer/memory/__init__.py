"""The memory planner: what serving a model takes, per rank, worked out from its metadata alone.

`nanoinfer memory` and the engine's KV pool both come from here. A plan reads a config.json or a
GGUF header (never the weights) and adds up, for every tensor-parallel x pipeline rank:

- weights, by storage format, mirroring what the engine builds (engine/model_setup.py and
  nanoinfer.quant.quantize_model): which linears are quantized and how their kernels pack them,
  what stays float (norms, the embedding, routers, MLA's latent projections), the int8 copy of a
  tied LM head, the float copies kept for large batches where our kernels do not run;
- the KV cache: the seeds' formula per token (2 x layers x KV heads x head dim x bytes; MLA: layers
  x (kv_lora_rank + qk_rope_head_dim) x bytes) times the pool the engine allocates (`kv_pool_bytes`,
  whole blocks);
- an estimate of peak activation memory for one step (see `activation_terms`), which nothing else
  in the engine uses.

A rank's share comes from model/parallel.py: `plan_shard`/`shard_config`/`shard_shapes` for tensor
parallelism, `stage_layers` for pipeline stages. Ranks are numbered stage x TP size + TP rank.
"""

from nanoinfer.memory.metadata import ModelMetadata, read_metadata
from nanoinfer.memory.plan import Fit, MemoryPlan, RankPlan, fit_memory, plan_memory
from nanoinfer.memory.pool import DEFAULT_KV_CAP_BYTES, engine_max_model_len, kv_pool_bytes
from nanoinfer.memory.report import format_bytes, format_plan

__all__ = [
    "DEFAULT_KV_CAP_BYTES",
    "Fit",
    "MemoryPlan",
    "ModelMetadata",
    "RankPlan",
    "engine_max_model_len",
    "fit_memory",
    "format_bytes",
    "format_plan",
    "kv_pool_bytes",
    "plan_memory",
    "read_metadata",
]
