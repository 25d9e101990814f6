"""Model-parallel ranks: rank 0 schedules and broadcasts each step; every rank runs its part.

Tensor parallelism (TP) splits every layer over the ranks; pipeline parallelism (PP) gives each
rank a contiguous run of layers (a stage). On one machine the engine (rank 0) spawns ranks
1..N-1 itself and rendezvouses with them over TCP on 127.0.0.1. Under torchrun (`env://`: RANK,
WORLD_SIZE, MASTER_ADDR set) every process runs the same program; the engine's constructor
turns ranks other than 0 into workers, which serve until rank 0 shuts down and then exit.

A step on rank 0: the runner broadcasts the chunks (token ids, positions, block tables) and the
KV copies the manager made since the last step; every rank builds the same ForwardBatch.
- TP: every rank runs its shard; the layers sum partial outputs across ranks and the head
  gathers the vocabulary, so rank 0 ends with the full logits and samples once.
- PP: the step is cut into micro-batches (one per stage, by chunks); rank 0 embeds each and runs
  stage 0's layers, then sends its hidden states on; each stage passes them to the next, the last
  back to rank 0, which holds the final norm and head. While stage 1 runs micro-batch 0, stage 0
  runs micro-batch 1, so the stages overlap.
Only rank 0 keeps scheduler, prefix cache and sampler state: the workers' KV pools have the same
number of blocks, and rank 0's block tables address all of them.
"""

from __future__ import annotations

import atexit
import base64
import datetime
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from nanoinfer.adapters.serving import LoRAManager
from nanoinfer.engine.model_setup import build_model
from nanoinfer.kernels import kernels
from nanoinfer.loading import ModelPackage, load_package
from nanoinfer.model.comm import Communicator, SharedMemoryComm, TorchDistributedComm
from nanoinfer.model.forward_batch import ForwardBatch, SequenceChunk
from nanoinfer.model.kv_cache import PagedKVCache
from nanoinfer.model.parallel import PipelineStage, TensorParallel, plan_shard, shard_weight

if TYPE_CHECKING:
    from nanoinfer.adapters.serving import AdapterFilter
    from nanoinfer.config import EngineConfig, ModelConfig
    from nanoinfer.model.transformer import Transformer

log = logging.getLogger(__name__)

# How long ranks wait for each other to start (loading a model included).
RENDEZVOUS_TIMEOUT_S = 600


@dataclass(frozen=True)
class RankRole:
    """What one rank of a model-parallel group holds: a tensor shard or a pipeline stage."""

    rank: int
    world: int
    pipeline: bool  # False: tensor parallel

    def weight_filter(self, name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor | None:
        """The loaders' filter: this rank's shard of every weight, or its stage's weights only."""
        if self.pipeline:
            return tensor if self.stage(config).holds(name) else None
        return shard_weight(name, tensor, config, plan_shard(config, self.rank, self.world))

    def adapter_filter(self, config: ModelConfig) -> AdapterFilter:
        """This rank's part of each LoRA matrix pair (`config`: the full model's): under TP, B's
        rows of a column-parallel projection or A's columns of a row-parallel one (whose partial
        outputs the layer's sum adds up); under PP, the pairs of this stage's layers."""

        def keep(layer: int, target: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
            part = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "attn"
            name = f"layers.{layer}.{part}.{target}.weight"
            if self.pipeline:
                return (a, b) if self.stage(config).holds(name) else None
            plan = plan_shard(config, self.rank, self.world)
            if target in ("o_proj", "down_proj"):
                return shard_weight(name, a, config, plan), b
            return a, shard_weight(name, b, config, plan)

        return keep

    def stage(self, config: ModelConfig) -> PipelineStage:
        return PipelineStage.of(config, self.rank, self.world)

    def check(self, config: ModelConfig) -> None:
        """Raise ModelLoadError if the model cannot be split this way (before any rank starts)."""
        for rank in range(self.world):
            if self.pipeline:
                PipelineStage.of(config, rank, self.world)
            else:
                plan_shard(config, rank, self.world)

    def build(self, package: ModelPackage, config: EngineConfig, quantization: str) -> Transformer:
        """This rank's model: the TP shard (its exchange is set by `connect`) or the PP stage."""
        c = package.config
        tp = None if self.pipeline else TensorParallel(plan_shard(c, self.rank, self.world), None)
        stage = self.stage(c) if self.pipeline else None
        return build_model(package, config.dtype, quantization, config.device, config.dense_above_rows, tp, stage)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def group_size(config: EngineConfig) -> tuple[int, bool]:
    """(ranks, pipeline?) of the model-parallel group `config` asks for; (1, False) for none."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_parallel_size and pipeline_parallel_size must be at least 1, got {tp} and {pp}")
    if tp > 1 and pp > 1:
        raise ValueError("tensor and pipeline parallelism together are not supported yet: choose one")
    return max(tp, pp), pp > 1


def _threads_per_rank(world: int) -> int:
    """Cores shared out so ranks on one host do not oversubscribe them."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(1, (os.cpu_count() or 1) // local)


# (slot changes to replay, (slot, rows) per chunk of the step) when adapters are served
LoRAStep = tuple[list[tuple], list[tuple[int, int]]]


@dataclass
class _Setup:
    """What rank 0 tells the workers once it has sized its KV pool."""

    num_blocks: int
    block_size: int
    kv_dtype: torch.dtype
    comm_capacity: int  # bytes per rank of one shared-memory exchange; 0: use torch.distributed's


class BroadcastKVCopies:
    """Rank 0's KV storage as the manager sees it: a copy is made here at once, and on the other
    ranks before the next step runs (which is the first that can read it)."""

    def __init__(self, kv: PagedKVCache):
        self.kv = kv
        self.pending: list[tuple[int, int, int, int]] = []

    def copy(self, src_block: int, dst_block: int, start: int, end: int) -> None:
        self.kv.copy(src_block, dst_block, start, end)
        self.pending.append((src_block, dst_block, start, end))


class ModelParallelGroup:
    """Rank 0's handle on the other ranks: how to build its own part, the spawned workers, each
    step's broadcast and (PP) the hidden states' round trip, shutdown."""

    def __init__(self, world: int, pipeline: bool, model: str | ModelPackage, config: EngineConfig):
        self.world, self.pipeline = world, pipeline
        self.procs: list[subprocess.Popen[bytes]] = []
        self.comm: Communicator | None = None
        self.tp: TensorParallel | None = None
        self.kv_copies: BroadcastKVCopies | None = None  # set by the engine with its KV pool
        self._closed = False
        if not dist.is_initialized():
            if launched_by_torchrun():
                dist.init_process_group(_backend(config.device), init_method="env://", timeout=_timeout())
            else:
                self._spawn(model, config)
        if dist.get_world_size() != world:
            raise ValueError(
                f"a group of {world} ranks was asked for, but the process group has {dist.get_world_size()}"
            )
        torch.set_num_threads(_threads_per_rank(world))
        self.role = RankRole(dist.get_rank(), world, pipeline)
        self.same_host = _same_host()
        atexit.register(self.shutdown)

    def _spawn(self, model: str | ModelPackage, config: EngineConfig) -> None:
        """Start ranks 1..world-1 as fresh interpreters (`python -m nanoinfer.engine.workers`):
        unlike multiprocessing's spawn, that never re-runs the user's main module."""
        if not isinstance(model, str):
            raise ValueError("model parallelism loads the model in every rank: pass its name or path, not a package")
        from nanoinfer.memory import read_metadata  # the config alone, to refuse a split before starting ranks

        RankRole(0, self.world, self.pipeline).check(read_metadata(model).config)
        init = f"tcp://127.0.0.1:{_free_port()}"
        job = base64.b64encode(pickle.dumps((model, config))).decode()
        for rank in range(1, self.world):
            argv = [sys.executable, "-m", "nanoinfer.engine.workers", str(rank), str(self.world), init, job]
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
        dist.init_process_group(
            _backend(config.device), init_method=init, rank=0, world_size=self.world, timeout=_timeout()
        )

    def build(self, package: ModelPackage, config: EngineConfig, quantization: str) -> Transformer:
        model = self.role.build(package, config, quantization)
        self.tp = model.tp
        return model

    def connect(self, setup: _Setup) -> None:
        """Tell the workers how to size their KV pools, set up the exchange, start watching them."""
        dist.broadcast_object_list([setup], src=0)
        self.comm = _make_comm(setup.comm_capacity)
        if self.tp is not None:
            self.tp.comm = self.comm
        if self.procs:
            threading.Thread(target=self._watch, name="parallel-watchdog", daemon=True).start()

    def setup_for(self, model_config: ModelConfig, config: EngineConfig, kv: PagedKVCache) -> _Setup:
        """What the workers need to mirror rank 0's KV pool (`model_config`: the full model's)."""
        capacity = comm_capacity(model_config, config) if self.same_host else 0
        return _Setup(kv.num_blocks, kv.block_size, kv.dtype, capacity)

    def _watch(self) -> None:
        """A worker that dies makes rank 0's pending exchange fail instead of waiting forever."""
        while not self._closed and all(p.poll() is None for p in self.procs):
            time.sleep(0.2)
        if not self._closed:
            dead = [f"rank {i + 1} (exit {p.returncode})" for i, p in enumerate(self.procs) if p.poll() is not None]
            log.error("a model-parallel worker stopped: %s", ", ".join(dead))
            if self.comm is not None:
                self.comm.abort()

    def execute(
        self, model: Transformer, kv: PagedKVCache, chunks: list[SequenceChunk], lora: LoRAStep | None = None
    ) -> torch.Tensor:
        """One step on every rank: logits of the chunks' logits rows, in chunk order. `lora`:
        rank 0's adapter slot changes since the last step and this step's (slot, rows) per chunk,
        already applied here."""
        assert self.comm is not None and self.kv_copies is not None
        copies, self.kv_copies.pending = self.kv_copies.pending, []
        parts = micro_batches(chunks, self.world) if self.pipeline else [chunks]
        self.comm.broadcast_object((copies, parts, lora))
        batches = [ForwardBatch.build(p, kv.block_size, model.config.sliding_window, model.device) for p in parts]
        rows = _rows_per_part(parts, lora)
        if not self.pipeline:
            _set_rows(model, rows[0])
            return model(batches[0], kv)
        return _first_stage(model, kv, batches, rows)

    def shutdown(self) -> None:
        """Stop the workers (they leave their loop on None) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.comm is not None:
                self.comm.broadcast_object(None)
        except Exception:  # noqa: BLE001 - a dead group has nothing left to stop
            pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def micro_batches(chunks: list[SequenceChunk], count: int) -> list[list[SequenceChunk]]:
    """`chunks` cut into at most `count` contiguous runs of about equal tokens (order kept, so the
    logits come back in chunk order); none empty."""
    if len(chunks) <= 1 or count <= 1:
        return [chunks]
    tokens = [len(c.token_ids) for c in chunks]
    parts: list[list[SequenceChunk]] = []
    current: list[SequenceChunk] = []
    total, done = sum(tokens), 0
    for chunk, n in zip(chunks, tokens):
        current.append(chunk)
        done += n
        if len(parts) < count - 1 and done >= total * (len(parts) + 1) / count:
            parts.append(current)
            current = []
    if current:
        parts.append(current)
    return parts


def _rows_per_part(parts: list[list[SequenceChunk]], lora: LoRAStep | None) -> list[list[tuple[int, int]] | None]:
    """Each micro-batch's (adapter slot, rows) per chunk, or None per part without adapters."""
    if lora is None:
        return [None] * len(parts)
    rows, start = lora[1], 0
    out: list[list[tuple[int, int]] | None] = []
    for part in parts:
        out.append(rows[start : start + len(part)])
        start += len(part)
    return out


def _set_rows(model: Transformer, rows: list[tuple[int, int]] | None) -> None:
    """Tell the adapter-wrapped projections whose rows are whose for the next forward."""
    if rows is not None and model.lora_batch is not None:
        model.lora_batch.set_rows(rows)


def _first_stage(
    model: Transformer, kv: PagedKVCache, batches: list[ForwardBatch], rows: list[list[tuple[int, int]] | None]
) -> torch.Tensor:
    """Rank 0's side of a pipeline step: embed and run stage 0 on every micro-batch, sending each
    on as it is done, then take the last stage's hidden states back and finish them."""
    world = dist.get_world_size()
    sends = []  # (work, tensor): a tensor must outlive its send
    for batch, part_rows in zip(batches, rows):
        _set_rows(model, part_rows)
        hidden = model.run_layers(model.embed_tokens(batch.input_ids), batch, kv).float().contiguous()
        sends.append((dist.isend(hidden, dst=1), hidden))
    logits = []
    for batch in batches:
        count = batch.num_tokens if batch.logits_indices is None else int(batch.logits_indices.numel())
        hidden = torch.empty(count, model.config.hidden_size)
        dist.recv(hidden, src=world - 1)
        logits.append(model.final_logits(hidden.to(model.dtype)))
    for work, _ in sends:
        if work is not None:  # None only for ranks outside the group
            work.wait()
    return torch.cat(logits)


def _later_stage(
    model: Transformer, kv: PagedKVCache, batches: list[ForwardBatch], rows: list[list[tuple[int, int]] | None]
) -> None:
    """A stage after the first: each micro-batch's hidden states in, its layers, out to the next
    stage (the last sends only the logits rows, back to rank 0)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    last = rank == world - 1
    sends = []
    for batch, part_rows in zip(batches, rows):
        _set_rows(model, part_rows)
        hidden = torch.empty(batch.num_tokens, model.config.hidden_size)
        dist.recv(hidden, src=rank - 1)
        out = model.run_layers(hidden.to(model.dtype), batch, kv)
        if last and batch.logits_indices is not None:
            out = out[batch.logits_indices]
        out = out.float().contiguous()
        sends.append((dist.isend(out, dst=0 if last else rank + 1), out))
    for work, _ in sends:
        if work is not None:  # None only for ranks outside the group
            work.wait()


def _backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _same_host() -> bool:
    """Whether every rank runs on this host (collective: every rank calls it once, at start)."""
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return len(set(hosts)) == 1


def _make_comm(capacity: int) -> Communicator:
    """Shared memory when rank 0 asked for it (every rank on its host, CPU, kernels built), else torch.distributed."""
    ours = kernels()
    if capacity and ours is not None:
        return SharedMemoryComm.over(ours, capacity)
    return TorchDistributedComm()


def comm_capacity(model_config: ModelConfig, config: EngineConfig) -> int:
    """Bytes per rank of one shared-memory exchange, or 0 where it cannot be used. Sized for the
    largest per-layer sum of a step (every batched token's hidden state) so a step's exchanges go
    in one piece each; logits and step descriptions larger than that go in pieces."""
    # NANOINFER_TP_COMM=torch: torch.distributed's collectives even where shared memory would do
    if torch.device(config.device).type != "cpu" or kernels() is None or os.environ.get("NANOINFER_TP_COMM") == "torch":
        return 0
    return 4 * model_config.hidden_size * max(config.max_num_batched_tokens, config.max_num_seqs)


# ---- ranks other than 0 ------------------------------------------------------------------------


def _worker_main(rank: int, world: int, init: str, model: str, config: EngineConfig) -> None:
    """Entry point of a spawned rank."""
    torch.set_num_threads(_threads_per_rank(world))
    dist.init_process_group(_backend(config.device), init_method=init, rank=rank, world_size=world, timeout=_timeout())
    _exit_with_parent()
    serve_as_worker(model, config)


def serve_as_worker(model: str, config: EngineConfig) -> None:
    """Load this rank's part, mirror rank 0's KV pool and run every step it broadcasts, until it
    says stop. Runs inside an initialized process group."""
    world, pipeline = group_size(config)
    role = RankRole(dist.get_rank(), world, pipeline)
    torch.set_num_threads(_threads_per_rank(world))
    _same_host()
    package = load_package(model, role.weight_filter)
    net = role.build(package, config, config.quantization or package.default_quantization)
    full_config = package.config
    kv_config = role.stage(full_config).kv_config(net.config) if pipeline else net.config
    del package
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    setup: _Setup = box[0]
    comm = _make_comm(setup.comm_capacity)
    if net.tp is not None:
        net.tp.comm = comm
    kv = PagedKVCache(kv_config, setup.num_blocks, setup.block_size, setup.kv_dtype, config.device)
    adapters = None
    if config.enable_lora:
        adapters = LoRAManager(net, config.max_loras, config.max_lora_rank, role.adapter_filter(full_config))
    try:
        _step_loop(net, kv, comm, pipeline, adapters)
    finally:
        dist.destroy_process_group()


def _step_loop(
    net: Transformer, kv: PagedKVCache, comm: Communicator, pipeline: bool, adapters: LoRAManager | None
) -> None:
    with torch.inference_mode():
        while True:
            message = comm.broadcast_object(None)
            if message is None:
                return
            copies, parts, lora = message
            for src, dst, start, end in copies:
                kv.copy(src, dst, start, end)
            if lora is not None and adapters is not None:
                adapters.replay(lora[0])
            batches = [ForwardBatch.build(p, kv.block_size, net.config.sliding_window, net.device) for p in parts]
            rows = _rows_per_part(parts, lora)
            if pipeline:
                _later_stage(net, kv, batches, rows)
            else:
                _set_rows(net, rows[0])
                net(batches[0], kv)


def _exit_with_parent() -> None:
    """A spawned rank whose engine process is gone (killed, crashed) exits instead of waiting."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_torchrun_worker_if_needed(model: str | ModelPackage, config: EngineConfig) -> None:
    """Under torchrun, ranks other than 0 become workers here and exit when rank 0 stops."""
    if group_size(config)[0] <= 1 or not launched_by_torchrun() or int(os.environ["RANK"]) == 0:
        return
    if not isinstance(model, str):
        raise ValueError("model parallelism loads the model in every rank: pass its name or path")
    dist.init_process_group(_backend(config.device), init_method="env://", timeout=_timeout())
    serve_as_worker(model, config)
    sys.exit(0)


if __name__ == "__main__":  # a rank started by ModelParallelGroup._spawn
    _rank, _world, _init, _job = sys.argv[1:]
    _worker_main(int(_rank), int(_world), _init, *pickle.loads(base64.b64decode(_job)))
