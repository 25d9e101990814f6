"""Tensor and pipeline parallelism: how weights split, shards summing to the whole model, and
the engine at N = 2 (real worker processes over gloo and shared memory) matching N = 1 token
for token."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_models import CASE_IDS, build_hf_model, save_case

from nanoinfer.config import ModelConfig
from nanoinfer.engine.model_setup import build_model
from nanoinfer.engine.workers import micro_batches
from nanoinfer.errors import ModelLoadError
from nanoinfer.llm import LLM
from nanoinfer.loading import expected_shapes, load_package
from nanoinfer.model.forward_batch import SequenceChunk
from nanoinfer.model.parallel import (
    PipelineStage,
    TensorParallel,
    plan_shard,
    shard_config,
    shard_shapes,
    shard_weight,
    split_evenly,
    stage_layers,
)
from nanoinfer.sampling_params import SamplingParams


def _config(**fields) -> ModelConfig:
    base = dict(
        architecture="llama",
        vocab_size=301,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    return ModelConfig(**{**base, **fields})


# ---- the split ---------------------------------------------------------------------------------


def test_split_evenly_gives_whole_units_and_differs_by_at_most_one():
    assert split_evenly(1536, 2, 32) == [(0, 768), (768, 1536)]
    assert split_evenly(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_evenly(96, 2, 32) == [(0, 64), (64, 96)]
    assert stage_layers(30, 4, 3) == (23, 30)


def test_smollm2_heads_split_unevenly_by_kv_group():
    # SmolLM2-135M: 9 query heads in 3 KV groups of 3: two groups on rank 0, one on rank 1
    c = _config(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576, intermediate_size=1536)
    plans = [plan_shard(c, r, 2) for r in range(2)]
    assert [(p.q_heads, p.kv_heads) for p in plans] == [((0, 6), (0, 2)), ((6, 9), (2, 3))]
    assert [p.intermediate for p in plans] == [(0, 768), (768, 1536)]
    assert [shard_config(c, p).num_heads for p in plans] == [6, 3]


def test_fewer_kv_heads_than_ranks_replicates_each_kv_head():
    c = _config(num_heads=4, num_kv_heads=1)
    plans = [plan_shard(c, r, 2) for r in range(2)]
    assert [(p.q_heads, p.kv_heads) for p in plans] == [((0, 2), (0, 1)), ((2, 4), (0, 1))]
    c = _config(num_heads=8, num_kv_heads=2)
    assert [plan_shard(c, r, 4).kv_heads for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]


@pytest.mark.parametrize(
    ("fields", "world", "message"),
    [
        (dict(num_heads=2, num_kv_heads=2), 3, "cannot split 2 attention heads over 3 ranks"),
        (dict(num_heads=4, num_kv_heads=2), 3, "must be a multiple of num_kv_heads"),
        (dict(num_heads=6, num_kv_heads=2, head_dim=8), 8, "cannot split 6 attention heads"),
        (dict(intermediate_size=3), 4, "cannot split intermediate_size 3 over 4 ranks"),
    ],
)
def test_what_cannot_be_split_is_refused_clearly(fields, world, message):
    with pytest.raises(ModelLoadError, match=message):
        for rank in range(world):
            plan_shard(_config(**fields), rank, world)


def test_vocabulary_rows_are_padded_to_the_same_count_on_every_rank():
    c = _config(vocab_size=301)
    plans = [plan_shard(c, r, 2) for r in range(2)]
    assert [p.vocab for p in plans] == [(0, 151), (151, 302)]
    embed = torch.arange(301 * 2, dtype=torch.float32).view(301, 2)
    last = shard_weight("embed.weight", embed, c, plans[1])
    assert last.shape == (151, 2)
    assert torch.equal(last[:150], embed[151:]) and not last[150].any()  # the padding row is zero


@pytest.mark.parametrize("case_id", ["llama", "qwen2", "qwen3_moe", "deepseek_v3", "phi3"])
def test_shard_shapes_predict_the_shards(tiny_model, case_id):
    """The planner's shapes (no data) and the loader's shards (data) agree for every weight."""
    package = load_package(tiny_model(case_id)[0])
    full = expected_shapes(package.config)
    for rank in range(2):
        plan = plan_shard(package.config, rank, 2)
        predicted = shard_shapes(full, package.config, plan)
        for name, tensor in package.weights.items():
            assert tuple(shard_weight(name, tensor, package.config, plan).shape) == predicted[name], name


# ---- shards sum to the whole model (ranks as threads, one process) ----------------------------


class ThreadComm:
    """The Communicator contract for ranks that are threads of this process: enough to check the
    sharded model's arithmetic without starting processes."""

    def __init__(self, rank: int, world: int, shared: tuple[threading.Barrier, list]):
        self.rank, self.world, self.seconds = rank, world, 0.0
        self.barrier, self.slots = shared

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[self.rank] = x.clone()
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(x)
        return x.copy_(sum(parts[1:], parts[0]))

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(x))

    def broadcast_object(self, obj):
        raise NotImplementedError

    def abort(self) -> None:
        pass


def _sharded_scores(package, world: int, ids: list[int], quantization: str = "none") -> list[torch.Tensor]:
    shared = (threading.Barrier(world), [None] * world)
    models = [
        build_model(
            package,
            "float32",
            quantization,
            "cpu",
            tp=TensorParallel(plan_shard(package.config, r, world), ThreadComm(r, world, shared)),
        )
        for r in range(world)
    ]
    out: list = [None] * world

    def run(rank: int) -> None:
        out[rank] = models[rank].score(ids)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_shards_sum_to_the_whole_model_for_every_architecture(tiny_model, case_id):
    """float32 logits of 2 ranks over the paged KV path (prefill of a whole prompt) within 1e-4 of one."""
    package = load_package(tiny_model(case_id)[0])
    ids = [1, 17, 42, 99, 5, 230, 64, 12, 7, 150, 33, 2]
    reference = build_model(package, "float32", "none", "cpu").score(ids)
    ranks = _sharded_scores(package, 2, ids)
    assert torch.equal(ranks[0], ranks[1])  # every rank sees the same full logits
    torch.testing.assert_close(ranks[0], reference, atol=1e-4, rtol=0)


def test_four_ranks_with_replicated_kv_heads(tiny_model):
    package = load_package(tiny_model("llama")[0])  # 4 heads, 2 KV heads: each KV head on two ranks
    ids = [1, 8, 9, 10, 11, 250]
    reference = build_model(package, "float32", "none", "cpu").score(ids)
    torch.testing.assert_close(_sharded_scores(package, 4, ids)[3], reference, atol=1e-4, rtol=0)


# ---- the engine with real ranks ----------------------------------------------------------------

PROMPTS = [
    [1, 5, 9, 23, 44, 71, 90, 5, 9, 23, 44],
    [1, 5, 9, 23, 44, 71, 90, 120, 8],  # shares a prefix with the first
    [1, 299, 12],
    [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57],
]


def _generate(model: str, tp: int, stats: dict | None = None, pp: int = 1, **engine) -> list[list[list[int]]]:
    llm = LLM(model, dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp, **engine)
    try:
        params = [
            SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=17, temperature=0.8, top_p=0.9, seed=7, n=2, ignore_eos=True),
            SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=9, temperature=1.0, top_k=20, seed=3, ignore_eos=True),
        ]
        results = llm.generate(PROMPTS, params)
        llm.engine.check_integrity()
        if stats is not None:
            stats.update(preemptions=llm.engine.scheduler.num_preemptions, hits=llm.engine.prefix_cache.hit_tokens)
        return [[list(c.token_ids) for c in r.outputs] for r in results]
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_two_ranks_generate_what_one_does(tiny_model, case_id):
    """Greedy and seeded sampling, a shared prefix (prefix cache), n = 2, and a KV pool so small
    the scheduler must preempt: the same tokens at N = 2 as at N = 1."""
    path = str(tiny_model(case_id)[0])
    engine = dict(block_size=16, prefix_page_size=8, kv_cache_memory=None, max_num_seqs=4)
    one = _generate(path, 1, **engine)
    assert _generate(path, 2, **engine) == one


def test_preemption_and_speculation_at_two_ranks(tiny_model):
    path = str(tiny_model("qwen3")[0])
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    # 6 blocks of 16 tokens (K and V x 2 layers x 2 KV heads x 16 dims x 4 bytes per token) for
    # four sequences of up to 43 tokens: some must wait or be preempted
    tight = dict(block_size=16, prefix_page_size=8, max_model_len=64, kv_cache_memory=6 * 16 * 2 * 2 * 2 * 16 * 4)
    stats: dict = {}
    one = _generate(path, 1, stats, speculative_config=spec, **tight)
    assert stats["preemptions"] > 0 and stats["hits"] > 0
    assert _generate(path, 2, speculative_config=spec, **tight) == one


def test_draft_model_speculation_at_two_ranks(tiny_model):
    """The draft model runs whole on rank 0 beside the sharded target (here: the target itself in int8)."""
    path = str(tiny_model("qwen3")[0])
    spec = {"method": "draft_model", "model": path, "quantization": "int8", "num_speculative_tokens": 3}
    assert _generate(path, 2, speculative_config=spec) == _generate(path, 1, speculative_config=spec)


def test_torch_distributed_collectives_give_the_same_tokens(tiny_model, monkeypatch):
    """NANOINFER_TP_COMM=torch: gloo's collectives instead of shared memory, as across hosts."""
    path = str(tiny_model("phi3")[0])
    one = _generate(path, 1)
    monkeypatch.setenv("NANOINFER_TP_COMM", "torch")
    assert _generate(path, 2) == one


def test_default_model_at_two_ranks(smollm_path):
    """The default model splits unevenly (9 heads, 3 KV heads): float32 greedy is identical;
    int4 (its default) runs on the fused C decode stack with the sums in shared memory."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompt = "The capital of France is"
    outputs = {}
    for tp in (1, 2):
        llm = LLM("smollm2-135m-instruct", dtype="float32", quantization="none", tensor_parallel_size=tp)
        outputs[tp] = llm.generate([prompt], params)[0].outputs[0].token_ids
        llm.engine.shutdown()
    assert outputs[2] == outputs[1]
    llm = LLM("smollm2-135m-instruct", tensor_parallel_size=2, max_model_len=512)
    try:
        text = llm.generate([prompt], params)[0].outputs[0].text
        assert "Paris" in text
        assert llm.engine.model_parallel.comm.seconds > 0  # the sums went through the exchange
    finally:
        llm.engine.shutdown()


def test_a_split_that_cannot_be_made_fails_before_starting_ranks(tiny_model):
    path = str(tiny_model("llama")[0])  # 4 heads, 2 KV heads
    with pytest.raises(ModelLoadError, match="multiple of num_kv_heads"):
        LLM(path, tensor_parallel_size=3)


def test_uneven_heads_run(tmp_path, tiny_tokenizer):
    """3 heads with 3 KV heads over 2 ranks: 2 + 1."""
    path = save_case(
        build_hf_model("llama", hidden_size=48, num_attention_heads=3, num_key_value_heads=3), tiny_tokenizer, tmp_path
    )
    assert _generate(str(path), 2) == _generate(str(path), 1)


def test_a_dead_rank_fails_the_step_instead_of_hanging(tiny_model):
    llm = LLM(str(tiny_model("llama")[0]), tensor_parallel_size=2)
    try:
        worker = llm.engine.model_parallel.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        start = time.monotonic()
        with pytest.raises(Exception, match="tensor-parallel rank stopped"):
            llm.generate(["hello"], SamplingParams(max_tokens=8))
        assert time.monotonic() - start < 10
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("flag", ["--tensor-parallel-size", "--pipeline-parallel-size"])
def test_torchrun_runs_the_same_program_on_every_rank(tiny_model, flag):
    """Under torchrun (env:// rendezvous) rank 0 runs the command and rank 1 serves its steps."""
    path = str(tiny_model("qwen2")[0])
    base = ["-m", "nanoinfer", "run", "--model", path, "--dtype", "float32", "--temperature", "0"]
    base += ["--max-tokens", "12", "hello there"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *base], capture_output=True, text=True, timeout=120, env=env)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533"]
    two = subprocess.run(
        [*launcher, *base[:-1], flag, "2", base[-1]],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=Path(__file__).parent.parent,
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert one.stdout.strip() and two.stdout == one.stdout


# ---- pipeline parallelism ----------------------------------------------------------------------


def test_stages_hold_their_layers_and_the_first_the_ends():
    c = _config(num_layers=5, layer_types=("sliding", "full", "full", "sliding", "full"), sliding_window=8)
    stages = [PipelineStage.of(c, s, 2) for s in range(2)]
    assert [s.layers for s in stages] == [(0, 3), (3, 5)]
    assert stages[0].holds("embed.weight") and stages[0].holds("norm.weight") and stages[0].holds("lm_head.weight")
    assert not stages[1].holds("embed.weight") and stages[1].holds("layers.4.mlp.down_proj.weight")
    assert not stages[1].holds("layers.2.attn.o_proj.weight")
    kv = stages[1].kv_config(c)
    assert kv.num_layers == 2 and kv.layer_types == ("sliding", "full")
    with pytest.raises(ModelLoadError, match="cannot split 5 layers into 6 pipeline stages"):
        PipelineStage.of(c, 0, 6)


def test_micro_batches_keep_order_and_balance_tokens():
    chunks = [SequenceChunk([1] * n, 0, [0]) for n in (1, 1, 1, 1, 30, 2)]
    parts = micro_batches(chunks, 2)
    assert [c for p in parts for c in p] == chunks and all(parts)
    assert [sum(len(c.token_ids) for c in p) for p in parts] == [34, 2]
    assert micro_batches(chunks[:1], 3) == [chunks[:1]]
    assert len(micro_batches([SequenceChunk([1], 0, [0]) for _ in range(9)], 3)) == 3


@pytest.mark.parametrize("case_id", ["llama", "gemma3", "qwen3_moe", "deepseek_v2"])
def test_two_stages_generate_what_one_does(tiny_model, case_id):
    """Greedy and seeded sampling, a shared prefix, n = 2 and preemption, over two stages."""
    path = str(tiny_model(case_id)[0])
    engine = dict(block_size=16, prefix_page_size=8, max_num_seqs=4)
    assert _generate(path, 1, pp=2, **engine) == _generate(path, 1, **engine)


def test_three_stages_with_speculation(tiny_model):
    path = str(tiny_model("gemma3")[0])  # 3 layers: one per stage
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    assert _generate(path, 1, pp=3, speculative_config=spec) == _generate(path, 1, speculative_config=spec)


def test_default_model_in_two_stages(smollm_path):
    """Whole layers per stage: even int4 (the default) gives the same tokens as one rank."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = ["The capital of France is", "Write a poem about the sea."]
    outputs = {}
    for pp in (1, 2):
        llm = LLM("smollm2-135m-instruct", pipeline_parallel_size=pp, max_model_len=512)
        try:
            outputs[pp] = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
        finally:
            llm.engine.shutdown()
    assert outputs[2] == outputs[1]


def test_tensor_and_pipeline_together_are_refused(tiny_model):
    with pytest.raises(ValueError, match="not supported yet"):
        LLM(str(tiny_model("llama")[0]), tensor_parallel_size=2, pipeline_parallel_size=2)


def test_server_at_two_ranks(tiny_model):
    """`serve -tp 2`: the OpenAI routes answer as at one rank, /metrics reads rank 0's engine, and
    stopping the server stops the workers."""
    import httpx
    from server_utils import running

    from nanoinfer.config import EngineConfig
    from nanoinfer.engine.engine import LLMEngine
    from nanoinfer.server.app import ServerConfig, create_app

    path = str(tiny_model("llama")[0])
    body = {"model": "m", "prompt": [1, 5, 9, 23, 44], "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    answers, workers = [], []
    for tp in (1, 2):
        engine_config = EngineConfig(dtype="float32", tensor_parallel_size=tp)
        engines: list[LLMEngine] = []

        def load(config: EngineConfig = engine_config, made: list[LLMEngine] = engines) -> LLMEngine:
            made.append(LLMEngine(path, config))
            return made[-1]

        app = create_app(None, ServerConfig(model=path, served_model_name="m"), loader=load)
        with running(app) as srv:
            reply = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            answers.append(reply.json()["choices"][0]["text"])
            assert "nanoinfer:generation_tokens_total" in httpx.get(f"{srv.url}/metrics").text
            group = engines[0].model_parallel
            workers += [] if group is None else group.procs
    assert answers[1] == answers[0]
    assert workers and all(p.wait(timeout=20) is not None for p in workers)
