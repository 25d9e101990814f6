"""How tensor-parallel ranks talk: the collectives a step needs, over torch.distributed.

The process group (gloo on CPU, NCCL on CUDA; `env://` under torchrun) is always
torch.distributed's. On one host on CPU the per-layer sums go through a shared-memory segment
instead (`SharedMemoryComm`, set up over that process group), because gloo's all-reduce of one
decode row costs hundreds of microseconds and a step needs two per layer (docs/performance.md,
"Tensor parallelism"). Both give every rank bit-identical results.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import tempfile
import time
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from nanoinfer.kernels import CpuKernels, ShmGroup, TensorParallelAborted


class Communicator(Protocol):
    rank: int
    world: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of every rank's `x` (contiguous float32), written into `x`."""
        ...

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` stacked in rank order: [world, *x.shape]."""
        ...

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (picklable) on every rank."""
        ...

    def abort(self) -> None:
        """Make every rank's pending and future collectives fail instead of waiting forever."""
        ...

    @property
    def seconds(self) -> float:
        """Time this rank has spent in collectives, waiting for the others included."""
        ...


class TorchDistributedComm:
    """Collectives of torch.distributed's default process group (any backend, any number of hosts)."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.seconds = 0.0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        dist.all_reduce(x)
        self.seconds += time.perf_counter() - start
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = torch.empty((self.world, *x.shape), dtype=x.dtype, device=x.device)
        if x.is_cuda:
            dist.all_gather_into_tensor(out, x)
        else:  # gloo has no all_gather_into_tensor
            dist.all_gather(list(out.unbind(0)), x)
        self.seconds += time.perf_counter() - start
        return out

    def broadcast_object(self, obj: Any) -> Any:
        start = time.perf_counter()
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        self.seconds += time.perf_counter() - start
        return box[0]

    def abort(self) -> None:
        pass  # a dead peer makes gloo's pending calls time out; nothing to wake here


class SharedMemoryComm:
    """Ranks on one host exchanging through a shared-memory segment with the C kernels' shm_*
    functions (see cpu_kernels.c for the protocol). Made collectively by every rank."""

    def __init__(self, kernels: CpuKernels, capacity: int, rank: int, world: int, path: str | None = None):
        """`capacity`: bytes each rank can put in one exchange (larger payloads go in pieces).
        Rank 0 creates the segment (`path` None) and shares its path; the others attach."""
        self.kernels, self.rank, self.world = kernels, rank, world
        header = 64 * (world + 1)
        size = header + 2 * world * capacity
        if path is None:
            fd, path = tempfile.mkstemp(prefix="nanoinfer-tp-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            os.ftruncate(fd, size)
        else:
            fd = os.open(path, os.O_RDWR)
        self.path = path
        self._map = mmap.mmap(fd, size)
        os.close(fd)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.group = ShmGroup(rank, world, capacity, base, base + header, 0, 0)
        self.group_pointer = self._group_ref = ctypes.pointer(self.group)

    @classmethod
    def over(cls, kernels: CpuKernels, capacity: int) -> SharedMemoryComm:
        """Set up collectively on every rank of torch.distributed's default process group, which
        must all be on this host."""
        rank, world = dist.get_rank(), dist.get_world_size()
        comm = cls(kernels, capacity, rank, world) if rank == 0 else None
        box = [comm.path if comm is not None else None]
        dist.broadcast_object_list(box, src=0)
        if comm is None:
            comm = cls(kernels, capacity, rank, world, box[0])
        dist.barrier()
        if rank == 0:
            os.unlink(comm.path)  # every rank has it mapped; the name is no longer needed
        return comm

    def _check(self, status: int) -> None:
        if status:
            raise TensorParallelAborted("a tensor-parallel rank stopped")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self._check(self.kernels.lib.shm_all_reduce(self._group_ref, x.data_ptr(), x.numel()))
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty((self.world, *x.shape), dtype=x.dtype)
        nbytes = x.numel() * x.element_size()
        self._check(self.kernels.lib.shm_all_gather(self._group_ref, x.data_ptr(), nbytes, out.data_ptr()))
        return out

    def broadcast_object(self, obj: Any) -> Any:
        size = torch.zeros(1, dtype=torch.int64)
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == 0 else b""
        size[0] = len(payload)
        self._check(self.kernels.lib.shm_broadcast(self._group_ref, size.data_ptr(), 8))
        buf = torch.empty(int(size[0]), dtype=torch.uint8)
        if self.rank == 0:
            buf.numpy()[:] = np.frombuffer(payload, dtype=np.uint8)
        self._check(self.kernels.lib.shm_broadcast(self._group_ref, buf.data_ptr(), buf.numel()))
        return obj if self.rank == 0 else pickle.loads(buf.numpy().tobytes())

    def abort(self) -> None:
        ctypes.c_int64.from_address(self.group.flags + 8 * 8 * self.world).value = 1

    @property
    def seconds(self) -> float:
        return self.group.ns / 1e9
