"""Tensor-parallel ranks: rank 0 schedules and broadcasts each step; every rank runs its shard.

On one machine the engine (rank 0) spawns ranks 1..N-1 itself and rendezvouses with them over
TCP on 127.0.0.1. Under torchrun (`env://`: RANK, WORLD_SIZE, MASTER_ADDR set) every process runs
the same program; the engine's constructor turns ranks other than 0 into workers, which serve
until rank 0 shuts down and then exit.

A step on rank 0: the runner broadcasts the chunks (token ids, positions, block tables) and the
KV copies the manager made since the last step, then every rank builds the same ForwardBatch
and runs its shard; the layers sum partial outputs across ranks and the head gathers the
vocabulary, so rank 0 ends up with the full logits and samples once. Only rank 0 keeps
scheduler, prefix cache and sampler state: the workers' KV pools have the same number of
blocks, and rank 0's block tables address all of them.
"""

from __future__ import annotations

import atexit
import base64
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

from nanoinfer.engine.model_setup import build_model
from nanoinfer.kernels import kernels
from nanoinfer.loading import ModelPackage, load_package
from nanoinfer.model.comm import Communicator, SharedMemoryComm, TorchDistributedComm
from nanoinfer.model.forward_batch import ForwardBatch, SequenceChunk
from nanoinfer.model.kv_cache import PagedKVCache
from nanoinfer.model.parallel import TensorParallel, plan_shard, shard_weight

if TYPE_CHECKING:
    from nanoinfer.config import EngineConfig, ModelConfig
    from nanoinfer.model.transformer import Transformer

log = logging.getLogger(__name__)

# How long ranks wait for each other to start (loading a model included).
RENDEZVOUS_TIMEOUT_S = 600


class RankShard:
    """The loaders' weight filter of one rank: keep this rank's shard of every weight."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        return shard_weight(name, tensor, config, plan_shard(config, self.rank, self.world))


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _threads_per_rank(world: int) -> int:
    """Cores shared out so ranks on one host do not oversubscribe them."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(1, (os.cpu_count() or 1) // local)


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


class TensorParallelGroup:
    """Rank 0's handle on the group: its TensorParallel for the model, the spawned workers, shutdown."""

    def __init__(self, world: int, model: str | ModelPackage, config: EngineConfig):
        self.world = world
        self.procs: list[subprocess.Popen[bytes]] = []
        self.comm: Communicator | None = None
        self.tp: TensorParallel | None = None
        self.kv_copies: BroadcastKVCopies | None = None  # set by the engine with its KV pool
        self._closed = False
        if not dist.is_initialized():
            if launched_by_torchrun():
                dist.init_process_group(_backend(config.device), init_method="env://", timeout=_timeout())
            else:
                self._spawn(world, model, config)
        if dist.get_world_size() != world:
            raise ValueError(f"tensor_parallel_size {world} but the process group has {dist.get_world_size()} ranks")
        torch.set_num_threads(_threads_per_rank(world))
        self.rank = dist.get_rank()
        self.same_host = _same_host()
        self._watchdog: threading.Thread | None = None
        atexit.register(self.shutdown)

    def _spawn(self, world: int, model: str | ModelPackage, config: EngineConfig) -> None:
        """Start ranks 1..world-1 as fresh interpreters (`python -m nanoinfer.engine.workers`):
        unlike multiprocessing's spawn, that never re-runs the user's main module."""
        if not isinstance(model, str):
            raise ValueError("tensor parallelism loads the model in every rank: pass its name or path, not a package")
        from nanoinfer.memory import read_metadata  # the config alone, to refuse a split before starting ranks

        config_only = read_metadata(model).config
        for rank in range(world):
            plan_shard(config_only, rank, world)
        init = f"tcp://127.0.0.1:{_free_port()}"
        job = base64.b64encode(pickle.dumps((model, config))).decode()
        for rank in range(1, world):
            argv = [sys.executable, "-m", "nanoinfer.engine.workers", str(rank), str(world), init, job]
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
        dist.init_process_group(_backend(config.device), init_method=init, rank=0, world_size=world, timeout=_timeout())

    def weight_filter(self) -> RankShard:
        return RankShard(self.rank, self.world)

    def tensor_parallel(self, model_config: ModelConfig) -> TensorParallel:
        """This rank's TensorParallel for building the model; its exchange comes with `connect`."""
        self.tp = TensorParallel(plan_shard(model_config, self.rank, self.world), None)
        return self.tp

    def connect(self, setup: _Setup) -> None:
        """Tell the workers how to size their KV pools, set up the exchange, start watching them."""
        assert self.tp is not None, "tensor_parallel() comes first"
        dist.broadcast_object_list([setup], src=0)
        self.comm = self.tp.comm = _make_comm(setup.comm_capacity)
        if self.procs:
            self._watchdog = threading.Thread(target=self._watch, name="tp-watchdog", daemon=True)
            self._watchdog.start()

    def setup_for(self, model_config: ModelConfig, config: EngineConfig, kv: PagedKVCache) -> _Setup:
        """What the workers need to mirror rank 0's KV pool (`model_config`: the full model's)."""
        capacity = comm_capacity(model_config, config) if self.same_host else 0
        return _Setup(kv.num_blocks, kv.block_size, kv.dtype, capacity)

    def _watch(self) -> None:
        """A worker that dies makes rank 0's pending exchange fail instead of waiting forever."""
        while not self._closed and all(p.poll() is None for p in self.procs):
            time.sleep(0.2)
        if not self._closed:
            dead = [
                f"rank {i + 1} (exit code {p.returncode})" for i, p in enumerate(self.procs) if p.poll() is not None
            ]
            log.error("tensor-parallel worker stopped: %s", ", ".join(dead))
            if self.comm is not None:
                self.comm.abort()

    def broadcast_step(self, chunks: list[SequenceChunk]) -> None:
        """Send a step to the workers, with the KV copies made since the last one."""
        assert self.comm is not None and self.kv_copies is not None
        copies, self.kv_copies.pending = self.kv_copies.pending, []
        self.comm.broadcast_object((copies, chunks))

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


def _backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _timeout() -> Any:
    import datetime

    return datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_comm(capacity: int) -> Communicator:
    """Shared memory when rank 0 asked for it (every rank on its host, CPU, kernels built), else torch.distributed."""
    ours = kernels()
    if capacity and ours is not None:
        return SharedMemoryComm.over(ours, capacity)
    return TorchDistributedComm()


def _same_host() -> bool:
    """Whether every rank runs on this host (collective: every rank calls it once, at start)."""
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return len(set(hosts)) == 1


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
    """Load this rank's shard, mirror rank 0's KV pool and run every step it broadcasts, until it
    says stop. Runs inside an initialized process group."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(_threads_per_rank(world))
    _same_host()
    package = load_package(model, RankShard(rank, world))
    quantization = config.quantization or package.default_quantization
    tp = TensorParallel(plan_shard(package.config, rank, world), None)
    net = build_model(package, config.dtype, quantization, config.device, config.dense_above_rows, tp)
    del package
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    setup: _Setup = box[0]
    comm = tp.comm = _make_comm(setup.comm_capacity)
    kv = PagedKVCache(net.config, setup.num_blocks, setup.block_size, setup.kv_dtype, config.device)
    try:
        _step_loop(net, kv, comm)
    finally:
        dist.destroy_process_group()


def _step_loop(net: Transformer, kv: PagedKVCache, comm: Communicator) -> None:
    while True:
        message = comm.broadcast_object(None)
        if message is None:
            return
        copies, chunks = message
        for src, dst, start, end in copies:
            kv.copy(src, dst, start, end)
        batch = ForwardBatch.build(chunks, kv.block_size, net.config.sliding_window, net.device)
        net(batch, kv)


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
    if config.tensor_parallel_size <= 1 or not launched_by_torchrun() or int(os.environ["RANK"]) == 0:
        return
    if not isinstance(model, str):
        raise ValueError("tensor parallelism loads the model in every rank: pass its name or path")
    dist.init_process_group(_backend(config.device), init_method="env://", timeout=_timeout())
    serve_as_worker(model, config)
    sys.exit(0)


if __name__ == "__main__":  # a rank started by TensorParallelGroup._spawn
    _rank, _world, _init, _job = sys.argv[1:]
    _worker_main(int(_rank), int(_world), _init, *pickle.loads(base64.b64decode(_job)))
