"""MLA prefill: the absorbed form MLAttention runs (latent rows through our paged C kernel)
against the expanded form (per-head K and V from kv_b_proj, torch SDPA), for one fresh prompt
through one DeepSeek-V2-Lite-shaped layer (nanoinfer/bench/mla.py's), median of 5 in turn.

    .venv/bin/python benchmarks/mla_prefill_forms.py 512
"""

import statistics
import sys
import time

import torch

from nanoinfer.bench.mla import BLOCK, _configs, layer_inputs, random_layer
from nanoinfer.model.forward_batch import SequenceChunk
from nanoinfer.model.kv_cache import write_slots

L = int(sys.argv[1]) if len(sys.argv) > 1 else 512
config = _configs()["mla"]
layer = random_layer(config)
blocks = L // BLOCK + 1
kv, batch, rope, x = layer_inputs(config, [SequenceChunk(list(range(L)), 0, list(range(blocks)))], blocks)


@torch.inference_mode()
def absorbed() -> float:
    """What MLAttention.forward runs for every row."""
    start = time.perf_counter()
    layer(x, rope, batch, kv.k[0], kv.v[0])
    return time.perf_counter() - start


@torch.inference_mode()
def expanded() -> float:
    """The expanded form (MLAttention._expanded, the training path's), writing the cache as well."""
    start = time.perf_counter()
    q_nope, q_pe, latent = layer._project(x, rope)
    write_slots(kv.k[0], batch.slot_mapping, latent[:, None])
    out = layer._expanded(q_nope[None], q_pe[None], latent[None])[0]
    layer.o_proj(out.reshape(L, -1))
    return time.perf_counter() - start


absorbed(), expanded()  # warm-up
samples: dict[str, list[float]] = {"absorbed": [], "expanded": []}
for _ in range(5):
    samples["absorbed"].append(absorbed())
    samples["expanded"].append(expanded())
print(f"{L}-token prompt, ms: " + ", ".join(f"{k} {1000 * statistics.median(v):.1f}" for k, v in samples.items()))
