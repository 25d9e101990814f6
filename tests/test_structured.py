"""Structured outputs (llguidance): every constrained output parses and validates, in the engine
and through the server; bad specs are refused with the field named."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from server_utils import running

from nanoinfer import LLM, SamplingParams, StructuredOutputsParams
from nanoinfer.config import EngineConfig
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.errors import RequestError
from nanoinfer.server.app import ServerConfig, create_app

MODEL = "smollm2-135m-instruct"


def _obj(props: dict, required: list[str] | None = None, **extra) -> dict:
    """An object schema, closed as OpenAI's strict mode requires unless `extra` says otherwise (an
    open object lets a small model ramble through invented keys until max_tokens)."""
    closed = {"additionalProperties": False, **extra}
    return {"type": "object", "properties": props, "required": list(props) if required is None else required, **closed}


_S, _I, _N, _B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
SCHEMAS = [
    _obj({"name": _S}),
    _obj({"age": _I}),
    _obj({"ok": _B}),
    _obj({"score": {"type": "number", "minimum": 0, "maximum": 1}}),
    _obj({"n": {"type": "integer", "minimum": -5, "maximum": 5}}),
    _obj({"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"unit": {"const": "celsius"}}),
    _obj({"tags": {"type": "array", "items": _S, "minItems": 1, "maxItems": 3}}),
    _obj({"xs": {"type": "array", "items": _I, "minItems": 2, "maxItems": 2}}),
    _obj({"xs": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 4}}),
    _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    _obj({"short": {"type": "string", "minLength": 2, "maxLength": 5}}),
    _obj({"when": {"type": "string", "format": "date"}}),
    _obj({"at": {"type": "string", "format": "date-time"}}),
    _obj({"mail": {"type": "string", "format": "email"}}),
    _obj({"id": {"type": "string", "format": "uuid"}}),
    _obj({"v": {"anyOf": [_I, _S]}}),
    _obj({"v": {"anyOf": [{"type": "null"}, _B]}}),
    _obj({"v": {"type": ["integer", "null"]}}),
    _obj({"inner": _obj({"a": _I, "b": _S})}),
    _obj({"inner": _obj({"deep": _obj({"x": _N})})}),
    _obj({"people": {"type": "array", "items": _obj({"name": _S, "age": _I}), "maxItems": 2}}),
    _obj({"a": _I, "b": _S}, required=["a"]),
    _obj({"a": _I, "b": _S}, required=[]),
    _obj({"a": _I}, additionalProperties=True),
    _obj({"a": _I, "opt": _B}, required=["a"]),
    {"type": "array", "items": _I, "minItems": 1, "maxItems": 5},
    {"type": "string", "enum": ["yes", "no"]},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"$defs": {"pt": _obj({"x": _I, "y": _I})}, **_obj({"p": {"$ref": "#/$defs/pt"}})},
    _obj({"meta": {"type": "object", "additionalProperties": _I, "maxProperties": 2}}),
    _obj({"m": {"oneOf": [_obj({"kind": {"const": "a"}}), _obj({"kind": {"const": "b"}, "n": _I})]}}),
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL)


def _prompt(llm: LLM, text: str = "Give me an example as JSON.") -> list[int]:
    return llm.chat_prompt([{"role": "user", "content": text}])


def test_every_schema_validates_at_temperature_0_and_1(llm):
    """33 schemas x (greedy, and 2 samples at temperature 1), all in one continuous batch."""
    prompt = _prompt(llm)
    params = [
        SamplingParams(temperature=t, max_tokens=160, seed=i, structured_outputs=StructuredOutputsParams(json=s))
        for i, s in enumerate(SCHEMAS)
        for t in (0.0, 1.0, 1.0)
    ]
    outs = [o.outputs[0] for o in llm.generate([prompt] * len(params), params)]
    finished = 0
    for p, out in zip(params, outs):
        schema = p.structured_outputs.json
        if out.finish_reason == "length":  # cut off (a 135M model can ramble: "1.000000..."): not complete
            continue
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), schema)
        finished += 1
    assert finished >= 0.75 * len(params), f"only {finished} of {len(params)} outputs completed"


def test_length_is_reported_when_the_budget_is_too_small(llm):
    spec = StructuredOutputsParams(json=SCHEMAS[22])
    out = llm.generate([_prompt(llm)], SamplingParams(temperature=0, max_tokens=6, structured_outputs=spec))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    with pytest.raises(ValueError):
        json.loads(out.text)


def test_regex_choice_grammar_and_json_object(llm):
    prompt = _prompt(llm, "Say something.")
    cases = [
        (StructuredOutputsParams(regex=r"\d{3}-\d{4}"), lambda t: re.fullmatch(r"\d{3}-\d{4}", t)),
        (StructuredOutputsParams(choice=["positive", "neutral", "a 'quoted' (odd) one"]), None),
        (StructuredOutputsParams(grammar='start: "The answer is " NUM "."\nNUM: /[0-9]+/'), None),
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    for spec, check in cases:
        for temperature in (0.0, 1.0):
            params = SamplingParams(temperature=temperature, seed=2, max_tokens=60, structured_outputs=spec)
            out = llm.generate([prompt], params)[0]
            if out.finish_reason == "length" and spec.json_object and temperature:  # any object may ramble on
                continue
            assert out.finish_reason == "stop", (spec, out.text)
            if spec.choice is not None:
                assert out.text in spec.choice
            elif spec.grammar is not None:
                assert re.fullmatch(r"The answer is [0-9]+\.", out.text)
            else:
                assert check is not None and check(out.text), out.text


def test_bad_specs_are_refused_naming_the_field(llm):
    bad = [
        {"json": {"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}},  # not enforceable
        {"json": "{not json"},
        {"json": {"type": "nonsense"}},
        {"regex": "(unclosed"},
        {"grammar": "start: undefined_rule"},
        {"choice": []},
        {"json": {"type": "object"}, "regex": "a"},
        {},
    ]
    for spec in bad:
        with pytest.raises(RequestError) as e:
            llm.generate([_prompt(llm)], SamplingParams(max_tokens=4, structured_outputs=spec))
        assert e.value.param == "structured_outputs", spec
    assert not llm.engine.has_unfinished_requests()


def test_with_n_logprobs_stop_preemption_and_speculation():
    """Constrained and free rows in one batch; n > 1; a pool so small that sequences are preempted
    and recomputed (grammar state kept); n-gram drafts checked against the grammar."""
    schema = _obj({"items": {"type": "array", "items": _obj({"id": _I, "label": _S}), "minItems": 2, "maxItems": 4}})
    spec = StructuredOutputsParams(json=schema)
    llm = LLM(MODEL, kv_cache_memory=600_000 * 16, block_size=16, speculative_config={"method": "ngram"})
    prompt = _prompt(llm, "List some items with ids and labels as JSON.")
    params = [
        SamplingParams(temperature=1.0, n=6, seed=5, max_tokens=200, logprobs=2, structured_outputs=spec),
        SamplingParams(temperature=0, max_tokens=200, structured_outputs=spec),
        SamplingParams(temperature=0.7, max_tokens=60),  # unconstrained neighbour
    ]
    outs = llm.generate([prompt] * 3, params)
    for out in outs[:2]:
        for choice in out.outputs:
            if choice.finish_reason == "stop":
                jsonschema.validate(json.loads(choice.text), schema)
    assert all(max(entry.values()) <= 0 for c in outs[0].outputs for entry in c.logprobs)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool was large enough: nothing was preempted"
    llm.engine.check_integrity()


def test_tiny_random_model_stays_in_the_language(tiny_model):
    directory, _ = tiny_model("llama")
    llm = LLM(str(directory))
    spec = StructuredOutputsParams(choice=["hello world", "quick brown fox"])
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=30, structured_outputs=spec)
    outs = llm.generate([[5, 6, 7]] * 8, params)
    assert all(o.text in spec.choice and o.finish_reason == "stop" for o in outs)


# ---- server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    app = create_app(
        None,
        ServerConfig(model=MODEL, served_model_name="smol"),
        loader=lambda: LLMEngine(MODEL, EngineConfig(max_model_len=1024, max_num_seqs=8)),
    )
    with running(app) as srv:
        yield srv


def test_server_response_format_and_structured_outputs(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    schema = _obj({"city": _S, "temperature_c": {"type": "integer", "minimum": -60, "maximum": 60}})
    messages = [{"role": "user", "content": "What is the weather in Paris? Answer as JSON."}]
    reply = client.chat.completions.create(
        model="smol",
        messages=messages,
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}},
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    short = [{"role": "user", "content": 'Reply with a JSON object like {"city": "..."} naming a big city.'}]
    reply = client.chat.completions.create(
        model="smol", messages=short, max_tokens=120, temperature=0, response_format={"type": "json_object"}
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    done = client.completions.create(
        model="smol", prompt="The answer:", max_tokens=10, extra_body={"structured_outputs": {"choice": ["yes", "no"]}}
    )
    assert done.choices[0].text in ("yes", "no")


def test_server_refuses_what_it_cannot_do(server):
    url = f"{server.url}/v1/chat/completions"
    messages = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    bad = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, None),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "bogus": 1}}, None),
        ({"tools": [tool]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, None),
    ]
    for extra, param in bad:
        r = httpx.post(url, json={"model": "smol", "messages": messages, "max_tokens": 4, **extra}, timeout=60)
        assert r.status_code == 400, (extra, r.text)
        body = r.json()["error"]
        if param is not None:
            assert body["param"] == param, (extra, body)


@pytest.mark.parametrize("case_id", ["llama", "qwen3", "gemma3"])
def test_every_schema_on_tiny_random_models(tiny_model, case_id):
    """Random weights wander, so many answers run out of tokens; every one that finishes validates."""
    directory, _ = tiny_model(case_id)
    llm = LLM(str(directory), max_num_seqs=128)
    params = [
        SamplingParams(temperature=t, max_tokens=64, seed=i, structured_outputs=StructuredOutputsParams(json=s))
        for i, s in enumerate(SCHEMAS)
        for t in (0.0, 1.0)
    ]
    outs = [o.outputs[0] for o in llm.generate([[5, 6, 7, 8]] * len(params), params)]
    complete = [(p, o) for p, o in zip(params, outs) if o.finish_reason == "stop"]
    for p, out in complete:
        jsonschema.validate(json.loads(out.text), p.structured_outputs.json)
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    assert len(complete) >= len(params) // 4, f"only {len(complete)} of {len(params)} finished"


def test_logprobs_are_of_the_constrained_distribution_and_stop_strings_apply(llm):
    prompt = _prompt(llm, "Say something.")
    only = StructuredOutputsParams(choice=["positive feedback"])  # one allowed token at every step
    out = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=20, logprobs=3, structured_outputs=only))[0]
    assert out.text == "positive feedback" and out.finish_reason == "stop"
    assert all(abs(entry[t]) < 1e-5 for t, entry in zip(out.token_ids, out.logprobs))  # a point mass: log 1
    spec = StructuredOutputsParams(json=_obj({"name": _S, "age": _I}))
    params = SamplingParams(temperature=0, max_tokens=60, stop=['"age"'], structured_outputs=spec)
    out = llm.generate([prompt], params)[0]
    assert out.finish_reason == "stop" and out.text.startswith('{"name": ') and '"age"' not in out.text


def test_regex_digits_are_ascii(llm):
    """llguidance's own \\d takes any Unicode digit; a regex constraint's \\d means 0-9."""
    from nanoinfer.engine.structured import ascii_digits

    assert ascii_digits(r"\d{2}[\d.]\D\\d") == r"[0-9]{2}[0-9.][^0-9]\\d"
    spec = StructuredOutputsParams(regex=r"\d{3}-\d{4}")
    params = SamplingParams(temperature=1.5, seed=4, max_tokens=20, n=16, structured_outputs=spec)
    out = llm.generate([_prompt(llm, "A phone number?")], params)[0]
    assert all(re.fullmatch(r"[0-9]{3}-[0-9]{4}", c.text) for c in out.outputs), [c.text for c in out.outputs]
