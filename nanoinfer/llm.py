"""LLM: the Python front door. Offline batch generation, chat, and streaming over one LLMEngine."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, TypeGuard, cast

from nanoinfer.adapters.serving import LoRARequest
from nanoinfer.config import EngineConfig
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.errors import NanoInferError
from nanoinfer.loading.registry import DEFAULT_MODEL
from nanoinfer.outputs import RequestOutput
from nanoinfer.sampling_params import SamplingParams

Prompt = str | list[int]


def _is_token_ids(prompts: Prompt | Sequence[Prompt]) -> TypeGuard[list[int]]:
    """Whether `prompts` is one prompt of token ids rather than a batch of prompts."""
    return not isinstance(prompts, str) and bool(prompts) and isinstance(prompts[0], int)


class LLM:
    """`LLM("smollm2-135m-instruct").generate(["Hello"], SamplingParams(max_tokens=32))`.

    `model` is a built-in name, an HF model directory or a .gguf file; engine knobs
    (block_size, max_num_seqs, kv_cache_memory, enable_prefix_cache, ...) pass through as kwargs.
    dtype "auto" computes in float32 over a float16 KV cache on CPU; dtype "float32" caches in
    float32 too (see EngineConfig).
    """

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "auto", **engine_kwargs: Any):
        self.engine = LLMEngine(model, EngineConfig(dtype=dtype, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def default_params(self, **overrides: Any) -> SamplingParams:
        """SamplingParams with the model's generation_config defaults under explicit overrides."""
        return SamplingParams.from_request(defaults=self.engine.generation, **overrides)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids) in one continuous batch; outputs in prompt order.

        `lora_request`: one adapter for every prompt, or one (or None: the base model) per prompt."""
        # One prompt (text or token ids) is a batch of one; anything else is a batch already.
        batch = [prompts] if isinstance(prompts, str) or _is_token_ids(prompts) else cast(Sequence[Prompt], prompts)
        params_list = params if isinstance(params, list) else [params or self.default_params()] * len(batch)
        if len(params_list) != len(batch):
            raise ValueError(f"got {len(batch)} prompts but {len(params_list)} SamplingParams")
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(batch)
        if len(loras) != len(batch):
            raise ValueError(f"got {len(batch)} prompts but {len(loras)} LoRA requests")
        ids = [self._submit(p, sp, lora) for p, sp, lora in zip(batch, params_list, loras)]
        finals: dict[str, RequestOutput] = {}
        try:
            while len(finals) < len(ids):
                for out in self.engine.step():
                    if out.error is not None:
                        raise NanoInferError(f"request {out.request_id} failed: {out.error}")
                    if out.finished:
                        finals[out.request_id] = out
        finally:
            for rid in ids:
                if rid not in finals:
                    self.engine.abort(rid)
        return [finals[rid] for rid in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield an output after every step that produced text for this prompt (see .outputs[i].delta_text)."""
        rid = self._submit(prompt, params or self.default_params())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    if out.error is not None:
                        raise NanoInferError(f"request {rid} failed: {out.error}")
                    yield out
                    if out.finished:
                        return
        finally:
            self.engine.abort(rid)

    def chat(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        **template_vars: Any,
    ) -> RequestOutput:
        """Render the model's chat template, then generate the assistant's answer."""
        return self.generate([self.chat_prompt(messages, add_generation_prompt, **template_vars)], params)[0]

    def chat_prompt(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_vars: Any
    ) -> list[int]:
        """Token ids of messages rendered by the chat template."""
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, **template_vars
        )

    def _submit(self, prompt: Prompt, params: SamplingParams, lora_request: LoRARequest | None = None) -> str:
        rid = f"llm-{next(self._ids)}"
        self.engine.add_request(rid, prompt, params, lora_request=lora_request)
        return rid
