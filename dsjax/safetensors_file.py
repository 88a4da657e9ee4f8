"""Reading and writing .safetensors files with numpy, bf16 and FP8 included.

The format (huggingface/safetensors): 8-byte little-endian header size N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw
little-endian tensor bytes. The `safetensors` package's numpy backend has no bf16 or FP8, so
dsjax reads the format itself through a memory map (a tensor is read only when asked for, so a
loader never holds a whole checkpoint) and writes it the same way. Files are checked against
their header: a truncated or corrupt file raises `SafetensorsError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read; the message names the file (and tensor)."""


class SafetensorsFile:
    """Lazy, memory-mapped view of one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{path}: truncated file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(MAX_HEADER, size - 8):
                    raise SafetensorsError(f"{path}: corrupt or truncated header (declares {n} bytes, file has {size})")
                header = json.loads(f.read(n).decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: cannot read safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._start = 8 + n
        self._entries = header
        data_size = size - self._start
        for name, entry in header.items():
            try:
                begin, end = entry["data_offsets"]
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
            except (KeyError, TypeError, ValueError) as e:
                raise SafetensorsError(f"{path}: tensor '{name}' has a malformed header entry {entry!r}") from e
            if end > data_size:
                raise SafetensorsError(f"{path}: truncated: tensor '{name}' ends at byte {end} "
                                       f"but the file holds {data_size} data bytes")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise SafetensorsError(f"{path}: tensor '{name}' byte range does not match shape {shape} "
                                       f"and dtype {entry['dtype']}")
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = self._map[self._start + begin: self._start + end]
        return np.frombuffer(raw, dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write(path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict | None = None) -> None:
    """Writes (name, array) pairs to `path` atomically (a temp file renamed into place)."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, arr in tensors:
        if arr.dtype not in NAMES:
            raise SafetensorsError(f"{path}: tensor '{name}' has unsupported dtype {arr.dtype}")
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in tensors:
            f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, path)
