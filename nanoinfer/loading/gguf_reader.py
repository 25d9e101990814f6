"""A fast, bounds-checked GGUF parser (header, metadata, tensor directory).

gguf.GGUFReader builds a numpy view for every element of every metadata array, which is slow for
Gemma 3's 262k-token vocabulary (docs/performance.md, "Loading"). This reader decodes the same
format directly and hands tensor bytes to `gguf.quants.dequantize`, the reference dequantizer.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value type -> (struct format, numpy dtype) for scalars
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"),
    1: ("<b", "<i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "<u1"),
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF file."""


@dataclass
class TensorInfo:
    """One entry of the tensor directory; `shape` is in HF (row-major) order, outermost first."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset in the file
    n_bytes: int


class GGUFFile:
    """Parsed GGUF file: `metadata` (key -> Python value) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            if size == 0:
                raise GGUFFormatError("file is empty")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = memoryview(self._map)
        self._pos = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    # -- primitive reads (every one bounds-checked, so a truncated file fails cleanly) ------

    def _take(self, n: int) -> memoryview:
        end = self._pos + n
        if n < 0 or end > len(self._buf):
            raise GGUFFormatError(f"unexpected end of file at byte {self._pos} (wanted {n} more bytes)")
        view = self._buf[self._pos : end]
        self._pos = end
        return view

    def _scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        n = self._scalar("<Q")
        return bytes(self._take(n)).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type, count = self._scalar("<I"), self._scalar("<Q")
            return self._array(item_type, count)
        if vtype in _SCALARS:
            value = self._scalar(_SCALARS[vtype][0])
            return bool(value) if vtype == _BOOL else value
        raise GGUFFormatError(f"unknown metadata value type {vtype}")

    def _array(self, item_type: int, count: int) -> list[Any]:
        if item_type == _STRING:
            out = []
            buf, pos, end = self._buf, self._pos, len(self._buf)
            for _ in range(count):  # hot loop for vocabularies: avoid method calls per item
                if pos + 8 > end:
                    raise GGUFFormatError("unexpected end of file inside a string array")
                n = int.from_bytes(buf[pos : pos + 8], "little")
                pos += 8
                if pos + n > end:
                    raise GGUFFormatError("unexpected end of file inside a string array")
                out.append(bytes(buf[pos : pos + n]).decode("utf-8", errors="replace"))
                pos += n
            self._pos = pos
            return out
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type][1])
            raw = self._take(dtype.itemsize * count)
            values = np.frombuffer(raw, dtype=dtype, count=count)
            return values.astype(bool).tolist() if item_type == _BOOL else values.tolist()
        if item_type == _ARRAY:
            return [self._array(self._scalar("<I"), self._scalar("<Q")) for _ in range(count)]
        raise GGUFFormatError(f"unknown array item type {item_type}")

    # -- layout -------------------------------------------------------------------------------

    def _parse(self) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        if bytes(self._take(4)) != GGUF_MAGIC:
            raise GGUFFormatError("not a GGUF file (bad magic)")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("<I")
            if n_dims > 8:
                raise GGUFFormatError(f"tensor {name} claims {n_dims} dimensions")
            dims = [self._scalar("<Q") for _ in range(n_dims)]
            infos.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // align) * align
        for name, dims, gtype, rel in infos:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"tensor {name} has unknown type {gtype}") from None
            n_elem = int(np.prod(dims)) if dims else 1
            if dims and dims[0] % block:
                raise GGUFFormatError(f"tensor {name}: row of {dims[0]} values is not a whole number of blocks")
            n_bytes = n_elem // block * type_size
            start = data_start + rel
            if start + n_bytes > len(self._buf):
                raise GGUFFormatError(f"tensor {name} extends past the end of the file (truncated?)")
            # GGUF lists dims innermost first; HF/torch order is the reverse.
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), gtype, start, n_bytes)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as uint8, shaped (*outer dims, bytes per row) for gguf.quants.dequantize."""
        info = self.tensors[name]
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
        rows = info.shape[:-1] if len(info.shape) > 1 else ()
        return data.reshape(*rows, -1) if rows else data.reshape(1, -1)

    def close(self) -> None:
        """Release the file mapping (tensors returned by `raw` must not be used afterwards)."""
        try:
            self._buf.release()
            self._map.close()
        except BufferError:  # a caller still holds a view; the mapping goes when that is collected
            pass
