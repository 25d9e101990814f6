"""LLMEngine: add_request / step / abort over the scheduler, model runner and sampler.

One step = schedule -> forward -> sample -> postprocess (stop checks, detokenize, cache, free).
A single request is the seeds' loop as a special case: its first step prefills the whole prompt,
each later step decodes one token reusing the KV cache.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch

from nanoinfer.adapters.peft_files import merge_adapter
from nanoinfer.adapters.serving import LoRAManager, LoRARequest
from nanoinfer.config import EngineConfig
from nanoinfer.engine.kv_cache_manager import KVCacheManager, KVStorage
from nanoinfer.engine.metrics import EngineMetrics, ExpertLoadCollector
from nanoinfer.engine.model_setup import build_model, kv_cache_dtype
from nanoinfer.engine.radix_cache import RadixCache
from nanoinfer.engine.runner import ModelRunner
from nanoinfer.engine.sampler import Sampler, SamplingState, row_logprobs
from nanoinfer.engine.scheduler import ScheduledChunk, Scheduler
from nanoinfer.engine.sequence import Sequence
from nanoinfer.engine.speculative import NgramProposer, Proposer, SpeculativeConfig, verify_token
from nanoinfer.engine.stop import StopChecker
from nanoinfer.engine.structured import StructuredOutputs
from nanoinfer.engine.workers import (
    BroadcastKVCopies,
    ModelParallelGroup,
    group_size,
    run_torchrun_worker_if_needed,
)
from nanoinfer.errors import RequestError
from nanoinfer.loading import ModelPackage, load_package
from nanoinfer.memory import kv_pool_bytes
from nanoinfer.model.kv_cache import PagedKVCache
from nanoinfer.outputs import CompletionOutput, RequestOutput
from nanoinfer.sampling_params import RequestOutputKind, SamplingParams
from nanoinfer.tokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float


class LLMEngine:
    """The serving core. Not thread-safe: one thread calls step(); see AsyncEngine for the rest."""

    def __init__(self, model: str | ModelPackage, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model_parallel = self._start_model_parallel(model, config)
        try:
            self._build(model, config)
        except BaseException:
            self.shutdown()  # the other ranks must not outlive a failed start
            raise

    def _build(self, model: str | ModelPackage, config: EngineConfig) -> None:
        """Load the model (this rank's shard), size the KV pool and set up every part of the engine."""
        group = self.model_parallel
        if isinstance(model, str):
            package = load_package(model, None if group is None else group.role.weight_filter)
        else:
            package = model
        self.model_config = package.config
        self.tokenizer = package.tokenizer
        self.generation = package.generation
        self.source = package.source
        self.quantization = config.quantization or package.default_quantization
        if config.merge_lora is not None:
            merge_adapter(package.weights, package.config, config.merge_lora)
        if group is None:
            self.model = build_model(package, config.dtype, self.quantization, config.device, config.dense_above_rows)
            self.kv_model_config = self.model.config
        else:
            self.model = group.build(package, config, self.quantization)
            # a pipeline stage caches its own layers only
            stage = group.role.stage(package.config) if group.pipeline else None
            self.kv_model_config = self.model.config if stage is None else stage.kv_config(self.model.config)
        dtype = self.model.dtype
        self.max_model_len = min(
            config.max_model_len or package.config.max_position_embeddings, package.config.max_position_embeddings
        )
        kv = self._make_kv_cache(kv_cache_dtype(config.kv_cache_dtype, dtype, config.device, config.dtype))
        if kv.num_slots < self.max_model_len:
            log.warning("KV pool holds %d tokens; max_model_len lowered from %d", kv.num_slots, self.max_model_len)
            self.max_model_len = kv.num_slots
        self.lora = None
        if config.enable_lora:
            adapter_filter = None if group is None else group.role.adapter_filter(package.config)
            # under model parallelism the other ranks repeat each slot change
            self.lora = LoRAManager(
                self.model, config.max_loras, config.max_lora_rank, adapter_filter, record_changes=group is not None
            )
        storage: KVStorage = kv
        if group is not None:
            group.connect(group.setup_for(self.model_config, config, kv))
            storage = group.kv_copies = BroadcastKVCopies(kv)
        self.runner = ModelRunner(self.model, kv, self.lora, group)
        # The one owner of block references; the scheduler asks it for memory, the engine never does.
        self.kv_manager = KVCacheManager(
            storage, kv.num_blocks, config.block_size, config.prefix_page_size, config.enable_prefix_cache
        )
        can_start = self._lora_slot_ready if self.lora is not None else None
        self.scheduler = Scheduler(self.kv_manager, config.max_num_seqs, config.max_num_batched_tokens, can_start)
        self.sampler = Sampler()
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size)
        self._mask_worker: ThreadPoolExecutor | None = None  # started by the first constrained request
        self.speculative = SpeculativeConfig.parse(config.speculative_config)
        self.proposer = self._make_proposer(package, kv.num_slots)
        self._num_steps = 0  # steps that proposed drafts: the proposer's clock for backing off
        self.metrics = EngineMetrics()
        if self.model_config.num_experts:
            self.metrics.registry.register(ExpertLoadCollector(self.model))
        self.metrics.kv_blocks_total.set(kv.num_blocks)
        self.eos_ids = set(self.generation.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self.last_step_requests: list[str] = []  # whom the latest step worked for (to fail them if it raised)
        self._synced = {"queries": 0, "hits": 0, "preemptions": 0}  # stats already counted in metrics

    @staticmethod
    def _start_model_parallel(model: str | ModelPackage, config: EngineConfig) -> ModelParallelGroup | None:
        """The tensor- or pipeline-parallel group this engine is rank 0 of, or None at one rank.
        Under torchrun the other ranks never return from here: they serve steps until rank 0
        shuts down."""
        size, pipeline = group_size(config)
        if size == 1:
            return None
        if config.merge_lora is not None:  # (served adapters are: enable_lora)
            raise ValueError("merge_lora is not supported with tensor or pipeline parallelism yet")
        run_torchrun_worker_if_needed(model, config)
        return ModelParallelGroup(size, pipeline, model, config)

    def shutdown(self) -> None:
        """Stop the model-parallel workers, if any (the engine cannot step afterwards)."""
        if self.model_parallel is not None:
            self.model_parallel.shutdown()

    @property
    def prefix_cache(self) -> RadixCache:
        """The manager's radix tree, for stats and benchmarks (``reset()`` between timed runs)."""
        return self.kv_manager.prefix_cache

    def _make_proposer(self, package: ModelPackage, target_slots: int) -> Proposer | None:
        spec = self.speculative
        if spec is None:
            return None
        if spec.method == "draft_model":
            from nanoinfer.engine.draft_model import DraftModelProposer  # loads a second model

            return DraftModelProposer(spec, package, self.config, target_slots)
        return NgramProposer(spec)

    def _make_kv_cache(self, dtype: torch.dtype) -> PagedKVCache:
        # The memory planner sizes the pool, so `nanoinfer memory` and the engine never disagree.
        # This rank's part: its shard config under TP, its stage's layers under PP.
        c = self.config
        memory = kv_pool_bytes(self.kv_model_config, dtype, c, self.max_model_len)
        return PagedKVCache.for_memory(self.kv_model_config, memory, c.block_size, dtype, c.device)

    # ---- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a request (text is encoded with the tokenizer's special tokens). Raises RequestError.

        Only requests with the same `cache_salt` and adapter share prefix-cache entries (None: the
        common pool); `lora_request` runs it through that LoRA adapter (loaded on first use)."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate_request(ids, params)
        lora_id = 0
        if lora_request is not None:
            self.add_lora(lora_request)
            lora_id = lora_request.lora_int_id
            # K/V computed through an adapter differ from the base model's: never share them.
            cache_salt = f"{cache_salt or ''}\x1flora:{lora_id}"
        now = time.monotonic()
        seq = self._new_sequence(request_id, 0, ids, params, now, cache_salt)
        seq.lora_id = lora_id
        seq.num_forks_pending = params.n - 1
        self.requests[request_id] = _Request(request_id, ids, params, [seq], now)
        self.scheduler.add(seq)
        self.metrics.prompt_tokens.inc(len(ids))

    def validate_request(self, ids: list[int], params: SamplingParams) -> None:
        """Every check a request must pass before it may be queued; raises RequestError naming the field.

        Pure (reads only the config), so the server runs it before a stream opens, off the engine thread."""
        if not ids:
            raise RequestError("the prompt is empty: at least one token is needed", "prompt")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad!r} is out of range for a vocabulary of {vocab}", "prompt")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"The prompt has {len(ids)} tokens, but this model's maximum context length is "
                f"{self.max_model_len} tokens (at least one must remain for the answer). Please shorten it.",
                "prompt",
                "context_length_exceeded",
            )
        params.check_vocab(vocab)
        params.check_limits(self.config.limits)
        if params.structured_outputs is not None:
            self.structured.grammar(params.structured_outputs)  # compiled once, cached for its sequences

    def _new_sequence(
        self,
        request_id: str,
        index: int,
        ids: list[int],
        params: SamplingParams,
        now: float,
        cache_salt: str | None = None,
    ) -> Sequence:
        sampling = SamplingState(params, ids, index)
        if params.structured_outputs is not None:
            sampling.grammar = self.structured.state(params.structured_outputs)
        return Sequence(
            request_id=request_id,
            index=index,
            prompt_ids=ids,
            params=params,
            sampling=sampling,
            detokenizer=IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens),
            stop_checker=StopChecker(params.stop or [], params.include_stop_str_in_output),
            arrival_time=now,
            cache_salt=cache_salt,
        )

    # ---- LoRA adapters ------------------------------------------------------------------------

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Load an adapter (checked: PEFT format, rank, shapes); RequestError if it cannot serve."""
        if self.lora is None:
            raise RequestError("this engine serves no LoRA adapters: start it with enable_lora=True", "lora")
        self.lora.add(lora_request)

    def remove_lora(self, lora_int_id: int) -> None:
        """Unload an adapter; refused while unfinished requests use it."""
        if self.lora is not None:
            self.lora.remove(lora_int_id, self._loras_in_use())

    def list_loras(self) -> list[LoRARequest]:
        return self.lora.requests() if self.lora is not None else []

    def _loras_in_use(self) -> set[int]:
        return {s.lora_id for r in self.requests.values() for s in r.seqs if not s.finished and s.lora_id}

    def _lora_slot_ready(self, seq: Sequence) -> bool:
        """A waiting sequence may start once its adapter holds a slot (taken from idle adapters)."""
        assert self.lora is not None
        running = {s.lora_id for s in self.scheduler.running if s.lora_id}
        return self.lora.acquire(seq.lora_id, running)

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is (waiting, prefilling, decoding) and free what it holds."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
        if self.proposer is not None:
            self.proposer.release_idle()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return an output for every request that made progress.

        A failure in one request's own work (detokenizing, stop checks) fails that request alone:
        its output carries the error and it is finished. A failure of the batch's forward pass or
        sampling raises, and the caller decides (AsyncEngine fails the requests in the batch)."""
        self._propose()
        chunks = self.scheduler.schedule()
        self.last_step_requests = list(dict.fromkeys(c.seq.request_id for c in chunks))
        if not chunks:
            self.update_metrics()
            return []
        masks = self._prefetch_masks(chunks)
        logits = self.runner.execute(chunks)
        if masks is not None:
            masks.result()  # the grammar masks of this step's constrained rows, computed meanwhile
        plain: list[tuple[ScheduledChunk, int]] = []  # completing chunks and their first logits row
        verifying: list[tuple[ScheduledChunk, int]] = []
        row = 0
        for chunk in [c for c in chunks if c.completes]:  # before commit moves num_computed
            (verifying if chunk.num_draft else plain).append((chunk, row))
            row += 1 + chunk.num_draft
        for chunk in chunks:
            self.scheduler.commit(chunk)
        rows, seqs = self._expand_forks(plain)
        sampled = self.sampler.sample(logits[rows], [s.sampling for s in seqs])
        now = time.monotonic()
        touched: dict[str, None] = {}
        failed: dict[str, str] = {}
        work = [
            (seq, partial(self._append, seq, token, logprobs, now))
            for seq, token, logprobs in zip(seqs, sampled.token_ids, sampled.logprobs)
        ]
        work += [(c.seq, partial(self._verify, c, logits[r : r + 1 + c.num_draft], now)) for c, r in verifying]
        for seq, run in work:
            if seq.request_id in failed:
                continue
            try:
                run()
            except Exception as e:  # noqa: BLE001 - a bug in one request's postprocessing stays there
                log.exception("request %s failed", seq.request_id)
                failed[seq.request_id] = f"{type(e).__name__}: {e}"
            touched[seq.request_id] = None
        self.update_metrics()
        outputs = [self._failed_output(rid, why) for rid, why in failed.items()]
        outputs += [out for r in touched if r in self.requests and (out := self._output(self.requests[r]))]
        self._retire_finished(touched)
        if self.proposer is not None:
            self.proposer.release_idle()  # finished, aborted or preempted sequences' draft KV
        return outputs

    def _prefetch_masks(self, chunks: list[ScheduledChunk]) -> Future[None] | None:
        """Compute the grammar masks that sampling will need while the forward pass runs
        (llguidance works without the GIL); the sampler then finds them cached."""
        grammars = [g for c in chunks if c.completes and (g := c.seq.sampling.grammar) is not None]
        if not grammars:
            return None
        if self._mask_worker is None:
            self._mask_worker = ThreadPoolExecutor(1, thread_name_prefix="nanoinfer-grammar")

        def compute() -> None:
            for grammar in grammars:
                grammar.allowed()

        return self._mask_worker.submit(compute)

    def _failed_output(self, request_id: str, error: str) -> RequestOutput:
        """Abort a request whose own work raised; its final output carries the error."""
        request = self.requests[request_id]
        self.abort(request_id)
        return RequestOutput(request_id, request.prompt_ids, [], True, error=error)

    def _expand_forks(self, completing: list[tuple[ScheduledChunk, int]]) -> tuple[list[int], list[Sequence]]:
        """Each completing chunk's logits row and sequence; n > 1: when the prompt is computed, fork
        the siblings, which all sample from the same row."""
        rows: list[int] = []
        seqs: list[Sequence] = []
        for chunk, row in completing:
            seq = chunk.seq
            rows.append(row)
            seqs.append(seq)
            if seq.num_forks_pending and not seq.output_ids:
                for sibling in self._fork(seq):
                    rows.append(row)
                    seqs.append(sibling)
        return rows, seqs

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The parent's siblings, started from its computed prompt (KVCacheManager.fork shares the
        full blocks and copies the partial last one). Returns those running now; the rest wait."""
        request = self.requests[parent.request_id]
        siblings = [
            self._new_sequence(
                parent.request_id, i, parent.prompt_ids, parent.params, parent.arrival_time, parent.cache_salt
            )
            for i in range(1, parent.num_forks_pending + 1)
        ]
        for sibling in siblings:
            sibling.lora_id = parent.lora_id
        request.seqs.extend(siblings)
        parent.num_forks_pending = 0
        return self.scheduler.add_forks(parent, siblings)

    # ---- speculative decoding ---------------------------------------------------------------

    def _propose(self) -> None:
        """Give each decoding sequence this step's drafts (none without speculative_config)."""
        if self.proposer is None:
            return
        self._num_steps += 1
        seqs = self.scheduler.decoding()
        limits = []
        for seq in seqs:
            # Room for the drafts and the token sampled after them, within max_tokens and the window.
            left = self.max_model_len - len(seq)
            if seq.params.max_tokens is not None:
                left = min(left, seq.params.max_tokens - len(seq.output_ids))
            limits.append(left - 1)
        self.proposer.propose(seqs, limits, self._num_steps)

    def _verify(self, chunk: ScheduledChunk, logits: torch.Tensor, now: float) -> None:
        """Keep the drafts the target agrees with, then its own next token (see speculative.py);
        give back the KV slots of the rest."""
        seq, drafts = chunk.seq, chunk.seq.draft_ids[: chunk.num_draft]
        accepted = 0
        p, grammar = seq.params, seq.sampling.grammar
        # Plain greedy rows do not depend on the tokens before them: one argmax for every position.
        plain = p.greedy and not (p.has_penalties or p.logit_bias) and grammar is None
        argmax = logits.argmax(dim=-1).tolist() if plain else None
        qs = [None] * (len(drafts) + 1) if seq.draft_probs is None else [*seq.draft_probs, None]
        for j, draft in enumerate([*drafts, None]):
            row = logits[j]
            if grammar is not None:  # masked after the tokens kept so far: invalid drafts have p = 0
                row = grammar.mask_(row.clone())
            token = argmax[j] if argmax is not None else verify_token(self.sampler, row, seq.sampling, draft, qs[j])
            kept = draft is not None and token == draft
            if kept:
                seq.num_computed += 1  # the draft's K/V, computed this step, is now the sequence's
                accepted += 1
            self._append(seq, token, row_logprobs(row, seq.params, token), now)
            if seq.finished or not kept:
                break
        seq.draft_ids, seq.draft_probs = [], None
        self.scheduler.trim(seq)
        self.metrics.count_drafts(len(drafts), accepted)
        self.proposer.record(seq.draft_state, len(drafts), accepted, self._num_steps)  # type: ignore[union-attr]

    def _append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None, now: float) -> None:
        """Add a sampled token, then decide whether seq stops and what text it may stream."""
        seq.append_token(token)
        grammar = seq.sampling.grammar
        if grammar is not None:
            grammar.accept(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        self.metrics.generation_tokens.inc()
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.metrics.ttft.observe(now - seq.arrival_time)
        elif seq.last_token_time is not None:
            self.metrics.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        start = len(seq.text)
        p = seq.params
        stop_token = (token in self.eos_ids and not p.ignore_eos) or token in (p.stop_token_ids or ())
        # The text of the token that ends the answer is not part of it (as in vLLM), unless asked
        # for: with special tokens kept, "</s>" would otherwise trail every answer.
        if not stop_token or p.include_stop_str_in_output:
            seq.text += seq.detokenizer.add(token)
        cut = seq.stop_checker.check(seq.text, start)
        grammar_done = grammar is not None and grammar.finished
        if cut is not None:
            seq.text = seq.text[:cut]
            self.scheduler.finish(seq, "stop")
        elif stop_token or grammar_done:
            self.scheduler.finish(seq, "stop")
        elif (p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens) or len(seq) >= self.max_model_len:
            self.scheduler.finish(seq, "length")
        if seq.finished and cut is None:
            seq.text += seq.detokenizer.flush()

    def _output(self, request: _Request) -> RequestOutput | None:
        """This step's output of a request, shaped by its params.output_kind (None: nothing to send)."""
        kind = request.params.output_kind
        finished = all(s.finished for s in request.seqs) and len(request.seqs) == request.params.n
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        outputs = [out for seq in request.seqs if (out := self._completion(seq, kind)) is not None]
        if kind is RequestOutputKind.DELTA and not outputs and not finished:
            return None
        head = request.seqs[0]
        metrics = {"arrival_time": request.arrival_time}
        if head.first_token_time is not None:
            metrics["ttft"] = head.first_token_time - request.arrival_time
        return RequestOutput(
            request.request_id,
            request.prompt_ids,
            sorted(outputs, key=lambda o: o.index),
            finished,
            num_cached_tokens=head.num_cached_prompt,
            metrics=metrics,
        )

    def _completion(self, seq: Sequence, kind: RequestOutputKind) -> CompletionOutput | None:
        """One choice's output: what is new since its last output, plus everything unless DELTA.

        DELTA copies only the new tokens, so a long stream costs O(length), not O(length^2)."""
        visible = len(seq.text) if seq.finished else seq.stop_checker.safe_prefix_len(seq.text)
        delta = seq.text[seq.num_streamed_chars : visible] if visible > seq.num_streamed_chars else ""
        seq.num_streamed_chars = max(seq.num_streamed_chars, visible)
        start, seq.num_sent_tokens = seq.num_sent_tokens, len(seq.output_ids)
        want_logprobs = seq.params.logprobs is not None
        if kind is RequestOutputKind.DELTA:
            newly_finished = seq.finished and not seq.finish_sent
            if not delta and start == len(seq.output_ids) and not newly_finished:
                return None  # nothing new for this choice (e.g. a finished sibling)
            seq.finish_sent = seq.finished
            new_ids = seq.output_ids[start:]
            return CompletionOutput(
                seq.index,
                delta,
                new_ids,
                seq.finish_reason,
                seq.logprobs[start:] if want_logprobs else None,
                delta,
                new_ids,
            )
        seq.finish_sent = seq.finished
        return CompletionOutput(
            seq.index,
            seq.text[:visible],
            list(seq.output_ids),
            seq.finish_reason,
            list(seq.logprobs) if want_logprobs else None,
            delta,
            seq.output_ids[start:],
        )

    def _retire_finished(self, touched: dict[str, None]) -> None:
        """Forget requests whose every choice has finished, recording their latency."""
        for rid in touched:
            request = self.requests.get(rid)
            if request and all(s.finished for s in request.seqs) and len(request.seqs) == request.params.n:
                self.metrics.e2e.observe(time.monotonic() - request.arrival_time)
                del self.requests[rid]

    def update_metrics(self) -> None:
        """Sync Prometheus gauges and counters with the scheduler and the KV cache manager."""
        m, s = self.metrics, self.scheduler
        cache = self.kv_manager.prefix_cache
        current = {"queries": cache.queried_tokens, "hits": cache.hit_tokens, "preemptions": s.num_preemptions}
        counters = {"queries": m.prefix_cache_queries, "hits": m.prefix_cache_hits, "preemptions": m.num_preemptions}
        for key, value in current.items():
            last = self._synced[key]
            counters[key].inc(value - last if value >= last else value)  # a reset source counts from zero
        self._synced = current
        m.num_requests_running.set(len(s.running))
        m.num_requests_waiting.set(len(s.waiting))
        usage = self.kv_manager.usage()
        m.kv_cache_usage_perc.set((usage.total - usage.free) / usage.total)
        m.kv_blocks_used.set(usage.in_use)
        m.kv_blocks_cached.set(usage.cached_only)

    def check_integrity(self) -> None:
        """Raise AssertionError unless every KV block (the draft model's too) is accounted for."""
        self.scheduler.check_integrity()
        if self.proposer is not None:
            self.proposer.check_integrity()
