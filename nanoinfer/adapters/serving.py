"""Serving LoRA adapters: LoRARequest (vLLM's names) and the LoRAManager that loads adapters,
keeps up to `max_loras` of them resident in slots, and tells the model each row's slot.

A request names its adapter; its sequence may start only once the adapter holds a slot. A slot
is taken from an adapter no running sequence uses (least recently used first), so the mix in
one batch is bounded by `max_loras` and a waiting request never evicts a running one's adapter.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from nanoinfer.adapters.peft_files import read_adapter
from nanoinfer.errors import ModelLoadError, RequestError
from nanoinfer.model.lora import TARGETS, LoRABatch, LoRASpec, MultiLoRALinear, target_rows
from nanoinfer.model.transformer import DecoderLayer

if TYPE_CHECKING:
    from nanoinfer.model.transformer import Transformer


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for a request: a name, a unique positive integer id, and its PEFT directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id}")


# What a model-parallel rank keeps of one adapter matrix pair: (layer, target, A, B) -> its part
# of (A, B), or None where the layer is not its own (see engine/workers.py).
AdapterFilter = Callable[[int, str, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


@dataclass
class _Adapter:
    request: LoRARequest
    spec: LoRASpec
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


class LoRAManager:
    """Adapters the engine knows, the slots they occupy, and each step's rows -> slots."""

    def __init__(
        self,
        model: Transformer,
        max_loras: int,
        max_lora_rank: int,
        adapter_filter: AdapterFilter | None = None,
        record_changes: bool = False,
    ) -> None:
        if max_loras < 1 or max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be at least 1")
        self.model = model
        self.adapter_filter = adapter_filter  # a model-parallel rank's part of each adapter
        # Slot changes since the last step, for the other ranks of a model-parallel group to
        # repeat: ("install", slot, request) or ("clear", slot). None: nobody repeats them.
        self.changes: list[tuple] | None = [] if record_changes else None
        self.max_lora_rank = max_lora_rank
        self.batch = LoRABatch(max_loras, max_lora_rank, model.device)
        model.lora_batch = self.batch  # rows without adapters keep the fused decode stack
        self.adapters: dict[int, _Adapter] = {}
        self.slots: list[int | None] = [None] * max_loras  # adapter id in slot i + 1
        # module path under a layer -> {layer index: its wrapped module}
        self._wrapped: dict[str, dict[int, MultiLoRALinear]] = {}
        self._clock = itertools.count(1)
        self._last_used: dict[int, int] = {}

    # -- adapters ----------------------------------------------------------------------------

    def add(self, request: LoRARequest) -> None:
        """Load and check an adapter (idempotent for the same id and path). Raises RequestError."""
        known = self.adapters.get(request.lora_int_id)
        if known is not None:
            if known.request.lora_path != request.lora_path:
                raise RequestError(f"lora_int_id {request.lora_int_id} is already {known.request.lora_name!r}", "lora")
            return
        try:
            spec, weights = read_adapter(request.lora_path, self.model.config.num_layers)
        except (ModelLoadError, ValueError) as e:
            raise RequestError(f"cannot load LoRA adapter {request.lora_name!r}: {e}", "lora") from None
        if self.adapter_filter is not None:
            weights = self._filtered(weights)
        if spec.r > self.max_lora_rank:
            raise RequestError(
                f"LoRA adapter {request.lora_name!r} has rank {spec.r}, above max_lora_rank {self.max_lora_rank}",
                "lora",
            )
        try:
            self._check_shapes(request, weights)
        except ValueError as e:  # targets this model cannot adapt
            raise RequestError(f"LoRA adapter {request.lora_name!r}: {e}", "lora") from None
        self.adapters[request.lora_int_id] = _Adapter(request, spec, weights)

    def _filtered(
        self, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        assert self.adapter_filter is not None
        out = {}
        for (layer, target), (a, b) in weights.items():
            kept = self.adapter_filter(layer, target, a, b)
            if kept is not None:
                out[(layer, target)] = kept
        return out

    def _check_shapes(
        self, request: LoRARequest, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        config = self.model.config
        for (layer, target), (a, b) in weights.items():
            module, rows = target_rows(config, target)
            parent_path, name = module.rsplit(".", 1)
            base = getattr(self.model.layers[layer].get_submodule(parent_path), name)
            base = base.base if isinstance(base, MultiLoRALinear) else base
            in_features = cast(int, base.in_features)
            want_a, want_b = (a.shape[0], in_features), (rows.stop - rows.start, a.shape[0])
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise RequestError(
                    f"LoRA adapter {request.lora_name!r} does not fit this model: layer {layer} {target} has "
                    f"A {tuple(a.shape)}, B {tuple(b.shape)}; the model needs A {want_a}, B {want_b}",
                    "lora",
                )

    def remove(self, lora_int_id: int, busy: set[int]) -> None:
        """Forget an adapter; refused while a running or waiting request uses it."""
        if lora_int_id in busy:
            raise RequestError("the adapter is in use by requests that have not finished", "lora")
        self.adapters.pop(lora_int_id, None)
        if lora_int_id in self.slots:
            slot = self.slots.index(lora_int_id) + 1
            self._clear(slot)
            self.slots[slot - 1] = None

    def find(self, name: str) -> LoRARequest | None:
        return next((a.request for a in self.adapters.values() if a.request.lora_name == name), None)

    def requests(self) -> list[LoRARequest]:
        return [a.request for a in self.adapters.values()]

    # -- slots -------------------------------------------------------------------------------

    def acquire(self, lora_int_id: int, busy: set[int]) -> bool:
        """Make the adapter resident; False when every slot holds an adapter in use (`busy`)."""
        if lora_int_id == 0:
            return True
        self._last_used[lora_int_id] = next(self._clock)
        if lora_int_id in self.slots:
            return True
        free = [i for i, held in enumerate(self.slots) if held is None]
        if not free:
            idle = [i for i, held in enumerate(self.slots) if held not in busy]
            if not idle:
                return False
            free = [min(idle, key=lambda i: self._last_used.get(self.slots[i] or 0, 0))]
        slot = free[0] + 1
        self._install(slot, self.adapters[lora_int_id])
        self.slots[slot - 1] = lora_int_id
        return True

    def slot_of(self, lora_int_id: int) -> int:
        return 0 if lora_int_id == 0 else self.slots.index(lora_int_id) + 1

    def _install(self, slot: int, adapter: _Adapter) -> None:
        self._clear(slot)
        if self.changes is not None:
            self.changes.append(("install", slot, adapter.request))
        self.batch.scaling[slot] = adapter.spec.scaling
        for (layer, target), (a, b) in adapter.weights.items():
            module, _ = target_rows(self.model.config, target)
            self._modules(module)[layer].load(slot, target, a, b)

    def _clear(self, slot: int) -> None:
        if self.changes is not None:
            self.changes.append(("clear", slot))
        self.batch.scaling[slot] = 0.0
        for modules in self._wrapped.values():
            for m in modules.values():
                m.clear(slot)

    def _modules(self, path: str) -> dict[int, MultiLoRALinear]:
        """Every layer's `path` projection wrapped for adapters (done once, when first needed)."""
        if path not in self._wrapped:
            config = self.model.config
            rows = {t: target_rows(config, t)[1] for t in TARGETS if target_rows(config, t)[0] == path}
            parent_path, name = path.rsplit(".", 1)
            wrapped = {}
            for index, layer in enumerate(self.model.layers):
                if not isinstance(layer, DecoderLayer):  # another pipeline stage's layer
                    continue
                parent = layer.get_submodule(parent_path)
                module = MultiLoRALinear(getattr(parent, name), rows, self.batch)
                setattr(parent, name, module)
                wrapped[index] = module
            self._wrapped[path] = wrapped
        return self._wrapped[path]

    def take_changes(self) -> list[tuple]:
        """The slot changes since the last call, for the other ranks to `replay`."""
        changes, self.changes = self.changes or [], []
        return changes

    def replay(self, changes: list[tuple]) -> None:
        """Repeat rank 0's slot changes on another rank of its model-parallel group."""
        for change in changes:
            if change[0] == "clear":
                self._clear(change[1])
                continue
            _, slot, request = change
            self.add(request)
            self._install(slot, self.adapters[request.lora_int_id])

    # -- steps -------------------------------------------------------------------------------

    def set_rows(self, slots_per_chunk: list[tuple[int, int]]) -> None:
        """This step's (slot, rows) per chunk, in batch order."""
        self.batch.set_rows(slots_per_chunk)
