"""LLM: the Python front door. Offline batch generation, chat, and streaming over one LLMEngine,
or over data-parallel replicas of one (`data_parallel_size`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeGuard, TypeVar, cast

from nanoinfer.adapters.serving import LoRARequest
from nanoinfer.config import EngineConfig
from nanoinfer.engine.data_parallel import DataParallelEngine, build_replicas
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.errors import NanoInferError
from nanoinfer.loading.registry import DEFAULT_MODEL
from nanoinfer.outputs import RequestOutput
from nanoinfer.sampling_params import SamplingParams

Prompt = str | list[int]
T = TypeVar("T")


def _is_token_ids(prompts: Prompt | Sequence[Prompt]) -> TypeGuard[list[int]]:
    """Whether `prompts` is one prompt of token ids rather than a batch of prompts."""
    return not isinstance(prompts, str) and bool(prompts) and isinstance(prompts[0], int)


class LLM:
    """`LLM("smollm2-135m-instruct").generate(["Hello"], SamplingParams(max_tokens=32))`.

    `model` is a built-in name, an HF model directory or a .gguf file; engine knobs
    (block_size, max_num_seqs, kv_cache_memory, enable_prefix_cache, ...) pass through as kwargs.
    dtype "auto" computes in float32 over a float16 KV cache on CPU; dtype "float32" caches in
    float32 too (see EngineConfig).

    data_parallel_size=D > 1 runs D replicas, each on its own thread with cores / D threads
    (engine/data_parallel.py); `engine` is then replica 0's, `engines` all of them, and
    `shutdown()` stops their threads.
    """

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "auto", **engine_kwargs: Any):
        config = EngineConfig(dtype=dtype, **engine_kwargs)
        self.replicas: DataParallelEngine | None = None
        if config.data_parallel_size > 1:
            self.replicas = DataParallelEngine.start(build_replicas(model, config))
            self.engine = self.replicas.engine
        else:
            self.engine = LLMEngine(model, config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    @property
    def engines(self) -> list[LLMEngine]:
        """Every replica's engine (just `engine` without data parallelism)."""
        return self.replicas.engines if self.replicas is not None else [self.engine]

    def shutdown(self) -> None:
        """Stop the replicas' threads and any tensor-parallel workers; the LLM cannot generate after."""
        if self.replicas is not None:
            self.replicas.shutdown()
        else:
            self.engine.shutdown()

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
        if self.replicas is not None:
            return _run(self._generate_replicated(batch, params_list, loras))
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
        if self.replicas is not None:
            yield from self._stream_replicated(prompt, params or self.default_params())
            return
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

    async def _generate_replicated(
        self, prompts: Sequence[Prompt], params: list[SamplingParams], loras: list[LoRARequest | None]
    ) -> list[RequestOutput]:
        """Every prompt routed to a replica, all running at once; finals in prompt order. The
        first failure cancels the rest (a cancelled request is aborted in its replica)."""
        assert self.replicas is not None
        replicas = self.replicas

        async def one(prompt: Prompt, sp: SamplingParams, lora: LoRARequest | None) -> RequestOutput:
            final = None
            async for out in replicas.generate(f"llm-{next(self._ids)}", prompt, sp, lora_request=lora):
                final = out
            assert final is not None and final.finished
            return final

        tasks = [asyncio.ensure_future(one(p, sp, lora)) for p, sp, lora in zip(prompts, params, loras)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    def _stream_replicated(self, prompt: Prompt, params: SamplingParams) -> Iterator[RequestOutput]:
        """`stream` over the replicas: the router's async stream, read on a loop of its own."""
        assert self.replicas is not None
        loop = asyncio.new_event_loop()
        outputs = self.replicas.generate(f"llm-{next(self._ids)}", prompt, params)
        try:
            while True:
                try:
                    out = loop.run_until_complete(outputs.__anext__())
                except StopAsyncIteration:
                    return
                yield out
                if out.finished:
                    return
        finally:
            loop.run_until_complete(outputs.aclose())  # aborts the request if it is still running
            loop.close()

    def _submit(self, prompt: Prompt, params: SamplingParams, lora_request: LoRARequest | None = None) -> str:
        rid = f"llm-{next(self._ids)}"
        self.engine.add_request(rid, prompt, params, lora_request=lora_request)
        return rid


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to the end from synchronous code, also where an event loop is running
    already (a notebook): then on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
