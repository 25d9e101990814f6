"""Serving LoRA adapters: several adapters and the base model in one batch, each row through its
own adapter (logits against PEFT), answers independent of the mix, prefix cache kept apart per
adapter, merging, refusals, and the server's --lora-modules, /v1/models and load/unload routes."""

from __future__ import annotations

import httpx
import openai
import peft
import pytest
import torch
import transformers
from server_utils import running, wait_idle

from nanoinfer import LLM, LoRARequest, SamplingParams
from nanoinfer.config import EngineConfig
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.errors import RequestError
from nanoinfer.server.app import ServerConfig, create_app

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# Short prompts share the masked product with decode rows; long ones (>= SEGMENT_ROWS) are segments.
PROMPTS = [[5, 17, 33, 40, 2 + i, 99, 120 + i] * (1 if i % 3 else 4) for i in range(8)]
ADAPTERS = [(["q_proj", "v_proj"], 4), (["o_proj", "down_proj"], 6), (["k_proj", "gate_proj", "up_proj"], 8)]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """Three PEFT adapters of the tiny llama (random B, so each changes the model), as LoRARequests."""
    path, _ = tiny_model("llama")
    out = tmp_path_factory.mktemp("adapters")
    requests = []
    for k, (targets, rank) in enumerate(ADAPTERS):
        base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = peft.get_peft_model(
            base, peft.LoraConfig(r=rank, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
        )
        torch.manual_seed(k)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.3)
        model.save_pretrained(out / f"a{k}")
        requests.append(LoRARequest(f"a{k}", k + 1, str(out / f"a{k}")))
    return path, requests


def _peft_logits(path, lora: LoRARequest | None, ids: list[int]) -> torch.Tensor:
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = base if lora is None else peft.PeftModel.from_pretrained(base, lora.lora_path)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_each_row_goes_through_its_own_adapter(adapters):
    path, loras = adapters
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=128)
    mix = [None, *loras] * 2
    outs = llm.generate(PROMPTS, GREEDY, lora_request=mix)
    for prompt, lora, out in zip(PROMPTS, mix, outs):
        alone = llm.generate([prompt], GREEDY, lora_request=lora)[0]
        assert alone.token_ids == out.token_ids, "the batch changed an answer"
        ids = prompt + out.token_ids
        engine = llm.engine
        lora_id = 0 if lora is None else lora.lora_int_id
        assert engine.lora is not None and engine.lora.acquire(lora_id, set())
        engine.lora.set_rows([(engine.lora.slot_of(lora_id), len(ids))])
        ours = engine.model.score(ids)
        assert torch.allclose(ours, _peft_logits(path, lora, ids), atol=1e-4)
    engine.lora.set_rows([])
    distinct = {tuple(o.token_ids) for o in outs[:4]}
    assert len(distinct) == 4, "every adapter should answer differently"
    llm.engine.check_integrity()


def test_prefix_cache_is_never_shared_across_adapters(adapters):
    path, loras = adapters
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_model_len=128, block_size=16, prefix_page_size=8)
    prompt = list(range(3, 60))
    params = SamplingParams(temperature=0, max_tokens=2)
    assert llm.generate([prompt], params)[0].num_cached_tokens == 0
    assert llm.generate([prompt], params, lora_request=loras[0])[0].num_cached_tokens == 0
    assert llm.generate([prompt], params, lora_request=loras[0])[0].num_cached_tokens > 0
    assert llm.generate([prompt], params, lora_request=loras[1])[0].num_cached_tokens == 0


def test_merged_adapter_answers_as_the_served_one(adapters):
    path, loras = adapters
    served = LLM(str(path), dtype="float32", enable_lora=True, max_model_len=128)
    merged = LLM(str(path), dtype="float32", merge_lora=loras[2].lora_path, max_model_len=128)
    for prompt in PROMPTS[:3]:
        want = served.generate([prompt], GREEDY, lora_request=loras[2])[0]
        assert merged.generate([prompt], GREEDY)[0].token_ids == want.token_ids
    ids = PROMPTS[0] + want.token_ids
    assert torch.allclose(merged.engine.model.score(ids), _peft_logits(path, loras[2], ids), atol=1e-4)


def test_adapters_that_cannot_serve_are_refused(adapters, tmp_path):
    path, loras = adapters
    small = LLM(str(path), dtype="float32", enable_lora=True, max_lora_rank=4, max_model_len=128)
    with pytest.raises(RequestError, match="rank 6, above max_lora_rank 4"):
        small.generate([PROMPTS[0]], GREEDY, lora_request=loras[1])
    with pytest.raises(RequestError, match="cannot load"):
        small.generate([PROMPTS[0]], GREEDY, lora_request=LoRARequest("x", 9, str(tmp_path)))
    plain = LLM(str(path), dtype="float32", max_model_len=128)
    with pytest.raises(RequestError, match="enable_lora"):
        plain.generate([PROMPTS[0]], GREEDY, lora_request=loras[0])
    small.engine.check_integrity()


def test_server_serves_adapters_by_name_and_loads_them_at_run_time(adapters, tmp_path):
    path, loras = adapters
    lm_head_adapter = str(tmp_path / "lm_head")  # PEFT adapts any linear; our layers take seven kinds
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])).save_pretrained(
        lm_head_adapter
    )
    config = ServerConfig(model=str(path), served_model_name="base", lora_modules=(("a0", loras[0].lora_path),))
    engine_config = EngineConfig(dtype="float32", max_model_len=128, enable_lora=True, max_loras=2, max_lora_rank=8)
    app = create_app(None, config, loader=lambda: LLMEngine(str(path), engine_config))
    reference = LLM(str(path), dtype="float32", enable_lora=True, max_model_len=128)
    with running(app) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"base", "a0"}
        for name, lora in (("a0", loras[0]), ("base", None)):
            reply = client.completions.create(
                model=name, prompt=PROMPTS[1], max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
            )
            want = reference.generate([PROMPTS[1]], GREEDY, lora_request=lora)[0]
            assert reply.choices[0].text == want.text and reply.model == name
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="a1", prompt="hi", max_tokens=2)
        load = httpx.post(f"{srv.url}/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": loras[1].lora_path})
        assert load.status_code == 200, load.text
        reply = client.completions.create(
            model="a1", prompt=PROMPTS[2], max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        assert reply.choices[0].text == reference.generate([PROMPTS[2]], GREEDY, lora_request=loras[1])[0].text
        assert "a1" in {m.id for m in client.models.list().data}
        bad = httpx.post(f"{srv.url}/v1/load_lora_adapter", json={"lora_name": "a9", "lora_path": "/nonexistent"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"
        head = httpx.post(f"{srv.url}/v1/load_lora_adapter", json={"lora_name": "h", "lora_path": lm_head_adapter})
        assert head.status_code == 400 and "lm_head, which this model lacks" in head.json()["error"]["message"]
        assert (
            httpx.post(
                f"{srv.url}/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": loras[1].lora_path}
            ).status_code
            == 400
        )
        assert httpx.post(f"{srv.url}/v1/unload_lora_adapter", json={"lora_name": "a1"}).status_code == 200
        assert httpx.post(f"{srv.url}/v1/unload_lora_adapter", json={"lora_name": "a1"}).status_code == 404
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="a1", prompt="hi", max_tokens=2)
        wait_idle(srv)


def test_steps_without_adapter_rows_keep_the_fused_decode_stack(adapters, monkeypatch):
    """Wrapping projections for adapters must not cost base-model traffic its one-call C decode:
    steps with no adapter row run fused, steps with one run layer by layer, answers unchanged."""
    from nanoinfer.model.transformer import Transformer

    path, loras = adapters
    kwargs = {"quantization": "int4", "max_model_len": 128, "enable_prefix_cache": False}
    plain = LLM(str(path), **kwargs)
    served = LLM(str(path), enable_lora=True, **kwargs)
    fused_steps: list[bool] = []
    real = Transformer._fused_stack

    def spy(self, *args):
        out = real(self, *args)
        fused_steps.append(out is not None)
        return out

    served.generate(PROMPTS[:1], GREEDY, lora_request=loras[0])  # the projections are wrapped from here on
    monkeypatch.setattr(Transformer, "_fused_stack", spy)
    base = served.generate(PROMPTS[:2], GREEDY)
    assert fused_steps.count(True) == GREEDY.max_tokens - 1, "every decode step should run fused"
    assert [o.token_ids for o in base] == [o.token_ids for o in plain.generate(PROMPTS[:2], GREEDY)]
    fused_steps.clear()
    mixed = served.generate(PROMPTS[:2], GREEDY, lora_request=[None, loras[0]])
    assert fused_steps and not any(fused_steps), "a step with adapter rows cannot run the base stack"
    assert mixed[0].token_ids == base[0].token_ids


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
def test_adapters_under_model_parallelism(adapters, parallel):
    """Each rank holds its part of every adapter (TP: B's rows or A's columns; PP: its layers'
    pairs) and repeats rank 0's slot changes: the same answers as one rank, with three adapters
    moving through two slots."""
    path, loras = adapters
    mix = [None, *loras] * 2
    answers = {}
    for name, split in (("one", {}), ("split", parallel)):
        llm = LLM(
            str(path), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=128, **split
        )
        try:
            answers[name] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, lora_request=mix)]
            for lora in [*loras, *reversed(loras)]:  # one at a time: slots are taken and given up
                answers[name].append(llm.generate([PROMPTS[0]], GREEDY, lora_request=lora)[0].outputs[0].token_ids)
        finally:
            llm.engine.shutdown()
    assert answers["split"] == answers["one"]
    assert len({tuple(a) for a in answers["one"][:4]}) == 4  # the adapters do change the answers
