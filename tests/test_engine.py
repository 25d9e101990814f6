"""The serving engine on tiny random models: batching, prefix cache, eviction, preemption, aborts, n > 1."""

from __future__ import annotations

import random

import pytest
import torch

from nanoinfer import LLM, SamplingParams
from nanoinfer.errors import RequestError
from nanoinfer.kernels import kernels
from nanoinfer.model.forward_batch import ForwardBatch, SequenceChunk
from nanoinfer.model.kv_cache import PagedKVCache, kv_bytes_per_token

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _prompts(count: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def _kv_memory(llm: LLM, tokens: int) -> int:
    return kv_bytes_per_token(llm.engine.model_config, torch.float32) * tokens


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")[0]


@pytest.fixture(scope="module")
def reference(model_dir):
    """Each prompt's greedy output computed alone, with a roomy KV pool and no prefix cache."""
    llm = LLM(str(model_dir), enable_prefix_cache=False)
    prompts = _prompts(32, 3, 60)
    return prompts, [llm.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_batched_greedy_equals_alone(model_dir, reference):
    prompts, alone = reference
    llm = LLM(str(model_dir), block_size=4)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" for o in outs)
    llm.engine.check_integrity()
    usage = llm.engine.kv_manager.usage()
    assert usage.in_use == 0 and usage.free + usage.cached_only == usage.total
    assert usage.cached_only == llm.engine.kv_manager.prefix_cache.cached_blocks()


def test_chunked_prefill_equals_alone(model_dir, reference):
    prompts, alone = reference
    llm = LLM(str(model_dir), block_size=4, max_num_batched_tokens=16, max_num_seqs=5)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == alone
    llm.engine.check_integrity()


def test_preemption_keeps_outputs(model_dir, reference):
    prompts, alone = reference
    llm = LLM(str(model_dir), block_size=4, kv_cache_memory=_kv_memory(llm_small(model_dir), 160))
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == alone
    llm.engine.check_integrity()


def test_prefix_cache_computes_only_the_suffix(model_dir):
    llm = LLM(str(model_dir), block_size=4)
    system = _prompts(1, 80, 80, seed=1)[0]
    first = llm.generate([system + [10, 11, 12]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    before = llm.engine.runner.num_forwarded_tokens
    second = llm.generate([system + [20, 21, 22, 23, 24]], GREEDY)[0]
    forwarded = llm.engine.runner.num_forwarded_tokens - before
    assert second.num_cached_tokens == 80  # whole blocks of the shared 80-token prefix
    # the 5-token suffix is prefilled, then 23 decode steps
    assert forwarded == 5 + (GREEDY.max_tokens - 1)
    alone = LLM(str(model_dir), enable_prefix_cache=False).generate([system + [20, 21, 22, 23, 24]], GREEDY)[0]
    assert second.token_ids == alone.token_ids
    llm.engine.check_integrity()


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny llama with room for prompts longer than two 128-token blocks."""
    from tiny_models import build_hf_model, save_case

    return save_case(
        build_hf_model("llama", max_position_embeddings=512), tiny_tokenizer, tmp_path_factory.mktemp("tiny_llama_512")
    )


SHORT = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("n", [20, 100, 243, 300])
def test_prefix_reuse_is_page_granular_with_128_token_blocks(long_model_dir, n):
    """A shared prefix of n tokens reuses all its whole 16-token pages, though blocks hold 128."""
    llm = LLM(str(long_model_dir))  # default block_size 128, prefix_page_size 16
    assert llm.engine.config.block_size == 128 and llm.engine.kv_manager.page_size == 16
    shared = _prompts(1, n, n, seed=n)[0]
    first, second = shared + [5, 6, 7], shared + [8, 9]
    assert llm.generate([first], SHORT)[0].num_cached_tokens == 0
    before = llm.engine.runner.num_forwarded_tokens
    out = llm.generate([second], SHORT)[0]
    print(f"shared prefix {n}: {out.num_cached_tokens} tokens reused")
    assert out.num_cached_tokens == n // 16 * 16 >= n - 16
    assert llm.engine.runner.num_forwarded_tokens - before == len(second) - out.num_cached_tokens + 7
    alone = LLM(str(long_model_dir), enable_prefix_cache=False).generate([second], SHORT)[0]
    assert out.token_ids == alone.token_ids
    llm.engine.check_integrity()


def test_prefix_hits_across_a_branch_inside_a_block_keep_greedy_outputs(long_model_dir):
    """Requests whose cached pages come from several requests' blocks (shared, copied tail,
    copied from two sources) answer as if computed alone."""
    llm = LLM(str(long_model_dir))
    shared = _prompts(1, 300, 300, seed=11)[0]
    a = shared + [5, 6, 7]
    b = shared + [8, 9]
    out_b = llm.generate([a, b], SHORT)[1]
    # c continues b: pages 16-17 of its block 2 lie in a's block 2, page 18 in b's (a branch).
    c = b + out_b.token_ids + [10, 11, 12]
    d = shared[:200] + [13] * 30  # the tail of block 1 copied, mid-page mismatch
    outs = llm.generate([c, d, b], SHORT)
    assert [o.num_cached_tokens for o in outs] == [304, 192, 288]
    reference = LLM(str(long_model_dir), enable_prefix_cache=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference.generate([c, d, b], SHORT)]
    llm.engine.check_integrity()


def test_n_samples_with_the_prefix_cache_and_large_blocks(long_model_dir):
    prompt = _prompts(1, 170, 170, seed=12)[0]  # a full 128-token block and a partial one to fork
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    llm = LLM(str(long_model_dir))
    llm.generate([prompt[:160] + [1, 2]], SHORT)  # so the prompt also hits the cache
    out = llm.generate([prompt], params)[0]
    assert out.num_cached_tokens == 160  # block 0 shared, 2 pages of block 1 copied
    alone = LLM(str(long_model_dir), enable_prefix_cache=False).generate([prompt], params)[0]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in alone.outputs]
    llm.engine.check_integrity()
    assert llm.engine.kv_manager.usage().in_use == 0


def test_eviction_under_small_budget(model_dir, reference):
    prompts, alone = reference
    pool_tokens = 400
    llm = LLM(
        str(model_dir), block_size=4, max_num_seqs=4, kv_cache_memory=_kv_memory(llm_small(model_dir), pool_tokens)
    )
    # round two runs in reverse, so the most recently cached prompts come back first and hit
    order = list(range(len(prompts))) + list(reversed(range(len(prompts))))
    for i in order:
        assert llm.generate([prompts[i]], GREEDY)[0].token_ids == alone[i]
        llm.engine.check_integrity()
    computed_blocks = sum((len(p) + GREEDY.max_tokens - 1) // 4 for p in prompts)
    assert computed_blocks > llm.engine.kv_manager.usage().total  # so the tree must have evicted
    assert llm.engine.kv_manager.prefix_cache.hit_tokens > 0


def llm_small(model_dir) -> LLM:
    return LLM(str(model_dir), max_num_seqs=1)


def test_abort_anywhere_frees_everything(model_dir):
    llm = LLM(str(model_dir), block_size=4, max_num_batched_tokens=8, max_num_seqs=2)
    engine = llm.engine
    prompts = _prompts(4, 20, 30, seed=3)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    engine.step()  # r0 prefilling (chunked), others waiting
    engine.abort("r3")  # waiting
    engine.abort("r0")  # mid-prefill
    for _ in range(12):
        engine.step()
    engine.abort("r1")  # decoding
    engine.check_integrity()
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.kv_manager.held_refs() == {}


def test_n_samples_share_the_prompt(model_dir):
    llm = LLM(str(model_dir), block_size=4, enable_prefix_cache=False)
    prompt = _prompts(1, 37, 37, seed=4)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    # the prompt is prefilled once; then each of 3 choices decodes 5 more tokens
    assert llm.engine.runner.num_forwarded_tokens == 37 + 3 * 5
    again = llm.generate([prompt], params)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    llm.engine.check_integrity()


def test_seeded_sample_independent_of_batch(model_dir):
    llm = LLM(str(model_dir), block_size=4)
    prompts = _prompts(6, 5, 30, seed=5)
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=10, ignore_eos=True) for i in range(6)]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    together = [o.token_ids for o in llm.generate(prompts, params)]
    assert alone == together


# float16 rounds each stored K and V to 11 significant bits; the logits move by ~1e-3 here
@pytest.mark.parametrize("cache_dtype, atol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_kv_cache_decode_matches_recompute(tiny_model, cache_dtype, atol):
    """Decoding token by token through the paged cache gives the logits of a full recomputation."""
    for case in ("llama", "gemma3"):  # gemma3 adds sliding-window layers
        directory, _ = tiny_model(case)
        model = LLM(str(directory)).engine.model
        ids = _prompts(1, 40, 40, seed=6)[0]
        full = model.score(ids)
        block_size = 4
        kv = PagedKVCache(model.config, 16, block_size, cache_dtype)
        table = list(range(15, -1, -1))  # deliberately non-contiguous blocks
        prefill = ForwardBatch.build([SequenceChunk(ids[:8], 0, table)], block_size, model.config.sliding_window)
        logits = [model(prefill, kv)[0]]
        for pos in range(8, len(ids)):
            step = ForwardBatch.build([SequenceChunk([ids[pos]], pos, table)], block_size, model.config.sliding_window)
            logits.append(model(step, kv)[0])
        torch.testing.assert_close(torch.stack(logits), full[7:], atol=atol, rtol=0)


def test_kv_cache_dtype_auto_and_explicit(model_dir, reference):
    """auto stores K/V in float16 where our C attention reads them, else in the activations' dtype;
    an explicit dtype is honoured on either path, and an unknown one is refused."""
    auto = LLM(str(model_dir), enable_prefix_cache=False)
    assert auto.engine.runner.kv_cache.k[0].dtype == (torch.float16 if kernels() else torch.float32)
    prompts, token_ids = reference
    for name in ("float32", "bfloat16"):  # bfloat16: not a kernel dtype, so the torch attention path
        llm = LLM(str(model_dir), enable_prefix_cache=False, kv_cache_dtype=name)
        assert llm.engine.runner.kv_cache.k[0].dtype == getattr(torch, name)
        out = llm.generate(prompts[:8], GREEDY)
        assert all(len(o.token_ids) == GREEDY.max_tokens for o in out)
        # another cache dtype than the reference's (auto): the first pick rarely moves
        agree = sum(o.token_ids[0] == ref[0] for o, ref in zip(out, token_ids[:8]))
        assert agree >= 7, f"{agree}/8 first tokens equal with a {name} cache"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(str(model_dir), kv_cache_dtype="int3")


def test_stop_conditions(model_dir):
    llm = LLM(str(model_dir))
    prompt = _prompts(1, 10, 10, seed=8)[0]
    free = llm.generate([prompt], GREEDY)[0]
    assert len(free.token_ids) == GREEDY.max_tokens and free.finish_reason == "length"
    # a stop string taken from the middle of the free-running text, possibly spanning tokens
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "the tiny model produced whitespace only"
    stopped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text and text.startswith(stopped.text)
    eos = free.token_ids[3]
    by_token = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[eos]))[0]
    assert by_token.finish_reason == "stop" and by_token.token_ids[-1] == eos
    # The stop token's text is not part of the answer, special or not, unless asked for.
    decode = llm.tokenizer.decode
    assert by_token.text == decode(by_token.token_ids[:-1]) and decode([eos]).strip()
    kept = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[eos], include_stop_str_in_output=True)
    assert llm.generate([prompt], kept)[0].text == decode(by_token.token_ids)
    raw = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[eos], skip_special_tokens=False)
    assert llm.generate([prompt], raw)[0].text == by_token.text
    short = LLM(str(model_dir), max_model_len=16).generate([prompt], GREEDY)[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 16 - len(prompt)


def test_streamed_deltas_join_to_text(model_dir):
    llm = LLM(str(model_dir))
    prompt = _prompts(1, 10, 10, seed=9)[0]
    pieces = [o.outputs[0].delta_text for o in llm.stream(prompt, GREEDY)]
    assert "".join(pieces) == llm.generate([prompt], GREEDY)[0].text


def test_bad_prompts_raise(model_dir):
    llm = LLM(str(model_dir), max_model_len=32)
    with pytest.raises(RequestError, match="40 tokens.*32"):
        llm.generate([[5] * 40], GREEDY)
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(RequestError, match="out of range"):
        llm.generate([[5, 100000]], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    llm.engine.check_integrity()


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_bfloat16_on_cpu_keeps_weights_16bit_and_activations_float32(model_dir, reference, quantization):
    from nanoinfer.quant import DenseForLargeBatch, HalfLinear, Int4Linear, Int8Linear

    llm = LLM(str(model_dir), dtype="bfloat16", quantization=quantization, enable_prefix_cache=False)
    model = llm.engine.model
    assert model.dtype == torch.float32
    assert llm.engine.runner.kv_cache.k[0].dtype == (torch.float16 if kernels() else torch.float32)  # "auto"
    assert model.embed.weight.dtype == torch.bfloat16
    down = model.layers[0].mlp.down_proj
    if quantization == "none":
        assert isinstance(down, HalfLinear)
    else:  # int4 and the int8 head on our kernels at every batch size (no float copies); without
        # them each keeps a float copy for large batches, 16-bit
        inner = down.quantized if isinstance(down, DenseForLargeBatch) else down
        assert isinstance(inner, Int4Linear) and (inner is down) == (inner.backend == "c")
        head = model.lm_head
        if kernels():
            assert isinstance(head, Int8Linear) and head.panels is not None
        else:
            assert isinstance(head, DenseForLargeBatch) and head.dense.dtype == torch.bfloat16
    prompts, token_ids = reference
    out = llm.generate(prompts[:8], GREEDY)
    if quantization == "none":  # bf16 weights, float32 math: the first pick rarely moves
        # (whole replies of a random tiny model drift apart; tests/test_quality.py holds the
        # real model to >= 99% top-1 agreement)
        agree = sum(o.token_ids[0] == ref[0] for o, ref in zip(out, token_ids[:8]))
        assert agree >= 7, f"{agree}/8 first tokens equal float32's"
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in out)
