"""One adapter per engine, each measuring the same workloads the same way.

Every adapter offers:
  prefill(ids) -> seconds for one forward over the prompt (batch 1)
  decode(ids, n) -> seconds for n decode steps after the prompt (batch 1, EOS ignored)
  serve(requests, concurrency) -> list[RequestTiming] for a closed loop of `concurrency` clients
and, for the speculative-decoding scenario (spec.py):
  complete(ids, n, eos) -> Completion: one greedy answer at batch 1 that stops at EOS
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from nanoinfer import LoRARequest, SamplingParams


@dataclass
class Request:
    prompt_ids: list[int]
    output_len: int
    lora_request: LoRARequest | None = None  # nanoinfer only: the adapter this request runs through


@dataclass
class RequestTiming:
    submit: float
    first_token: float
    finish: float
    output_len: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.submit

    @property
    def tpot(self) -> float:
        return (self.finish - self.first_token) / max(self.output_len - 1, 1)


@dataclass
class Completion:
    """One greedy answer at batch 1."""

    token_ids: list[int]
    decode_s: float  # from the first token to the last
    decode_tokens: int  # tokens after those the first forward produced
    steps: int | None  # forward passes after the first (None: the engine does not say)


class _TokenClock:
    """A transformers streamer that notes when each forward's tokens arrive (the first put is the prompt)."""

    def __init__(self) -> None:
        self.puts: list[tuple[float, int]] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.puts.append((time.perf_counter(), value.numel()))
        self.prompt_seen = True

    def end(self) -> None:
        pass


class NanoinferPeer:
    name = "nanoinfer"

    def __init__(self, model: str, dtype: str = "auto", quantization: str | None = None, **engine_kwargs: Any):
        from nanoinfer import LLM

        kwargs = dict(engine_kwargs)
        if quantization is not None:
            kwargs["quantization"] = quantization
        self.model, self.dtype, self.kwargs = model, dtype, kwargs
        self.llm = LLM(model, dtype=dtype, **kwargs)
        self.engine = self.llm.engine

    def describe(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "quantization": self.engine.quantization,
            **{k: v for k, v in self.kwargs.items() if isinstance(v, (str, int, bool))},
        }

    def reconfigure(self, **engine_kwargs: Any) -> None:
        """A fresh engine with other knobs (e.g. prefix cache off); weights are loaded again."""
        from nanoinfer import LLM

        if self.llm.replicas is not None:
            self.llm.shutdown()  # the old replicas' threads
        self.llm = LLM(self.model, dtype=self.dtype, **{**self.kwargs, **engine_kwargs})
        self.engine = self.llm.engine

    def reset_cache(self) -> None:
        """Drop what earlier runs cached (every replica's, each on its own thread)."""
        if self.llm.replicas is not None:
            self.llm.replicas.call_each(lambda e: e.prefix_cache.reset()).result()
        else:
            self.engine.prefix_cache.reset()

    def _params(self, n: int, ignore_eos: bool = True) -> SamplingParams:
        from nanoinfer import SamplingParams

        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=ignore_eos)

    def prefill(self, ids: list[int]) -> float:
        self.reset_cache()  # measure computing the prompt, not finding it cached
        start = time.perf_counter()
        self.llm.generate([ids], self._params(1))
        return time.perf_counter() - start

    def decode(self, ids: list[int], n: int) -> float:
        self.reset_cache()
        first: float | None = None
        for _ in self.llm.stream(ids, self._params(n + 1)):
            if first is None:
                first = time.perf_counter()
        if first is None:
            raise RuntimeError("the engine returned no output")
        return time.perf_counter() - first

    def complete(self, ids: list[int], n: int, eos: list[int] | None = None) -> Completion:
        """Greedy until EOS or n tokens; every step that streams tokens is one forward pass.
        (`eos` is the engine's own set already.)"""
        from nanoinfer import SamplingParams

        self.reset_cache()
        times: list[float] = []
        token_ids: list[int] = []
        for out in self.llm.stream(ids, SamplingParams(temperature=0, max_tokens=n)):
            if out.outputs[0].delta_token_ids:
                times.append(time.perf_counter())
                token_ids = out.token_ids
        if not times:
            raise RuntimeError("the engine returned no output")
        return Completion(token_ids, times[-1] - times[0], len(token_ids) - 1, len(times) - 1)

    def serve(self, requests: list[Request], concurrency: int, fresh_cache: bool = True) -> list[RequestTiming]:
        """Closed loop; fresh_cache drops what earlier runs cached, so repetitions measure the same work."""
        if fresh_cache:
            self.reset_cache()
        if self.llm.replicas is not None:
            return asyncio.run(self._serve_replicated(requests, concurrency))
        loop = ClosedLoop(self, requests, concurrency)
        while not loop.done:
            loop.step()
        return loop.timings()

    async def _serve_replicated(self, requests: list[Request], concurrency: int) -> list[RequestTiming]:
        """The closed loop over data-parallel replicas: `concurrency` clients of the router."""
        replicas = self.llm.replicas
        assert replicas is not None
        pending = list(enumerate(requests))
        timings: dict[int, RequestTiming] = {}

        async def client() -> None:
            while pending:
                i, req = pending.pop(0)
                t = timings[i] = RequestTiming(time.perf_counter(), 0.0, 0.0, req.output_len)
                rid = f"bench-{i}-{time.perf_counter_ns()}"
                params = self._params(req.output_len)
                async for out in replicas.generate(rid, req.prompt_ids, params, lora_request=req.lora_request):
                    now = time.perf_counter()
                    t.first_token = t.first_token or now
                    if out.finished:
                        t.finish = now

        await asyncio.gather(*[client() for _ in range(concurrency)])
        return [timings[i] for i in range(len(requests))]


class ClosedLoop:
    """`concurrency` closed-loop clients of one NanoinferPeer's engine (no replicas), advanced one
    engine step at a time: a client sends its next request as soon as its last one finishes.

    Several loops can take turns step by step on one machine (bench.spec), so the clock here is
    the loop's own: `busy_s` sums the time of its steps and submissions, and every RequestTiming
    is read from it. Greedy; each request stops at its output_len, or earlier at EOS when
    `stop_at_eos`. `token_ids[i]` and `token_steps[i]` are request i's tokens and the steps
    that brought it any."""

    def __init__(self, peer: NanoinferPeer, requests: list[Request], concurrency: int, stop_at_eos: bool = False):
        self.engine, self.busy_s = peer.engine, 0.0
        self.params = [peer._params(r.output_len, ignore_eos=not stop_at_eos) for r in requests]
        self.pending = list(enumerate(requests))
        self.records: dict[int, RequestTiming] = {}
        self.token_ids: dict[int, list[int]] = {}
        self.token_steps: dict[int, int] = {}
        self.live: dict[str, int] = {}
        start = time.perf_counter()
        while self.pending and len(self.live) < concurrency:
            self._submit()
        self.busy_s += time.perf_counter() - start

    @property
    def done(self) -> bool:
        return not self.live

    def step(self) -> None:
        start = time.perf_counter()
        outputs = self.engine.step()
        self.busy_s += time.perf_counter() - start
        for out in outputs:
            i = self.live[out.request_id]
            t = self.records[i]
            if len(out.outputs[0].token_ids) > len(self.token_ids[i]):
                self.token_ids[i] = out.outputs[0].token_ids
                self.token_steps[i] += 1
                t.first_token = t.first_token or self.busy_s
            if out.finished:
                t.finish = self.busy_s
                del self.live[out.request_id]
                if self.pending:
                    start = time.perf_counter()
                    self._submit()
                    self.busy_s += time.perf_counter() - start

    def timings(self) -> list[RequestTiming]:
        return [self.records[i] for i in range(len(self.records))]

    def _submit(self) -> None:
        i, req = self.pending.pop(0)
        rid = f"bench-{i}-{time.perf_counter_ns()}"
        self.engine.add_request(rid, req.prompt_ids, self.params[i], lora_request=req.lora_request)
        self.live[rid] = i
        self.records[i] = RequestTiming(self.busy_s, 0.0, 0.0, req.output_len)
        self.token_ids[i], self.token_steps[i] = [], 0


class LlamaCppPeer:
    """llama-cpp-python serving one request at a time, as its Python API does."""

    name = "llama.cpp"

    def __init__(self, gguf_path: Path, threads: int, n_ctx: int = 2048, prompt_lookup: int | None = None):
        """prompt_lookup: draft that many tokens by prompt lookup (LlamaPromptLookupDecoding)."""
        from llama_cpp import Llama

        draft = None
        if prompt_lookup:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=prompt_lookup)
        self.gguf_path, self.threads = gguf_path, threads
        self.llm = Llama(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            draft_model=draft,
            verbose=False,
        )
        self.eos = self.llm.token_eos()

    def describe(self) -> dict[str, Any]:
        import llama_cpp

        return {"version": llama_cpp.__version__, "threads": self.llm.n_threads}

    def _complete(self, ids: list[int], n: int) -> tuple[float, float]:
        """(time of first token, time of finish) for one greedy completion of n tokens, EOS banned."""
        self.llm.reset()  # no reuse of the previous prompt's KV
        first: float | None = None
        for _ in self.llm.create_completion(
            ids, max_tokens=n, temperature=0.0, stream=True, logit_bias={self.eos: -1e9}
        ):
            if first is None:
                first = time.perf_counter()
        return first or time.perf_counter(), time.perf_counter()

    def prefill(self, ids: list[int]) -> float:
        start = time.perf_counter()
        self._complete(ids, 1)
        return time.perf_counter() - start

    def decode(self, ids: list[int], n: int) -> float:
        first, end = self._complete(ids, n + 1)
        return end - first

    def complete(self, ids: list[int], n: int, eos: list[int] | None = None) -> Completion:
        # generate() yields ids one by one even when a forward verified several, so it cannot
        # tell forwards apart: steps stays unknown.
        self.llm.reset()
        stop = set(eos or [self.eos])
        token_ids: list[int] = []
        first = now = 0.0
        for token in self.llm.generate(ids, temp=0.0, reset=True):
            now = time.perf_counter()
            if not token_ids:
                first = now
            token_ids.append(token)
            if token in stop or len(token_ids) >= n:
                break
        return Completion(token_ids, now - first, max(len(token_ids) - 1, 0), None)

    def serve(self, requests: list[Request], concurrency: int) -> list[RequestTiming]:
        # One server, FIFO, `concurrency` closed-loop clients: a request is submitted when a slot
        # frees, so its queueing time behind earlier requests counts in its TTFT.
        slots_free_at = [time.perf_counter()] * concurrency
        timings: list[RequestTiming] = []
        for req in requests:
            submit = min(slots_free_at)
            first, end = self._complete(req.prompt_ids, req.output_len)
            slots_free_at[slots_free_at.index(submit)] = end
            timings.append(RequestTiming(submit, first, end, req.output_len))
        return timings


class TransformersPeer:
    """transformers' model (loaded from the same GGUF), static padded batches of the concurrency size."""

    name = "transformers"

    def __init__(self, model_path: Path):
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        transformers.utils.logging.disable_progress_bar()
        if model_path.suffix == ".gguf":
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

            config = AutoConfig.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            tensors = load_gguf_checkpoint(str(model_path), return_tensors=True, model_to_load=model)["tensors"]
            model.load_state_dict(tensors, strict=False)
            model.tie_weights()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
        self.model = model.eval()

    def describe(self) -> dict[str, Any]:
        import transformers

        return {"version": transformers.__version__, "dtype": "float32", "attn": self.model.config._attn_implementation}

    @torch.inference_mode()
    def _run(self, prompts: list[list[int]], out_lens: list[int]) -> tuple[float, list[float]]:
        """Greedy decode of a left-padded batch; (first-token time, per-request finish times)."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # logits_to_keep=1, as generate() does: the prompt's other positions need no LM head (at 64 x
        # 512 tokens that head alone is 1.9 TFLOP and 6 GB of logits).
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        first = time.perf_counter()
        finish = [first if n <= 1 else 0.0 for n in out_lens]
        for step in range(1, max(out_lens)):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=token,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            now = time.perf_counter()
            for i, n in enumerate(out_lens):
                if n == step + 1:
                    finish[i] = now
        return first, finish

    def prefill(self, ids: list[int]) -> float:
        start = time.perf_counter()
        self._run([ids], [1])
        return time.perf_counter() - start

    def decode(self, ids: list[int], n: int) -> float:
        first, finish = self._run([ids], [n + 1])
        return finish[0] - first

    @torch.inference_mode()
    def complete(
        self, ids: list[int], n: int, eos: list[int] | None = None, prompt_lookup: int | None = None
    ) -> Completion:
        """Greedy generate() until EOS or n tokens; prompt_lookup: its prompt-lookup decoding with
        that many draft tokens. generate(), not _run: assisted decoding lives only there."""
        clock = _TokenClock()
        prompt = torch.tensor([ids])
        eos = eos if eos is not None else self.model.generation_config.eos_token_id
        out = self.model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0] if isinstance(eos, list) else eos,
            prompt_lookup_num_tokens=prompt_lookup,
            streamer=clock,
        )
        if not clock.puts:
            raise RuntimeError("generate() streamed no tokens")
        # A forward verifying drafts streams all its tokens in one put, the first one included.
        (first, first_n), (last, _) = clock.puts[0], clock.puts[-1]
        token_ids = out[0, len(ids) :].tolist()
        return Completion(token_ids, last - first, len(token_ids) - first_n, len(clock.puts) - 1)

    def serve(self, requests: list[Request], concurrency: int) -> list[RequestTiming]:
        timings: list[RequestTiming] = []
        for i in range(0, len(requests), concurrency):
            batch = requests[i : i + concurrency]
            submit = time.perf_counter()
            first, finish = self._run([r.prompt_ids for r in batch], [r.output_len for r in batch])
            timings += [RequestTiming(submit, first, f, r.output_len) for r, f in zip(batch, finish)]
        return timings
