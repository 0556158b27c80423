"""The GGUF header and tensor index, parsed here rather than by gguf.GGUFReader, which builds a numpy
view per token string and takes about a minute on a 128k vocabulary. Tensors stay memory-mapped."""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ouvert.checkpoint.base import CheckpointError
from ouvert.checkpoint.gguf.codec import GGUFTensor, gguf_lib

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


class GGUFFile:
    """A GGUF file's metadata and tensors, memory-mapped. gguf.GGUFReader builds a numpy view for
    every token and merge string, which takes a minute for a 128k vocabulary; this reads the same
    header in well under a second and leaves the tensor bytes on disk until asked for."""

    def __init__(self, path: Path):
        g = gguf_lib()
        self.path = path
        with open(path, "rb") as fh:
            try:
                # copy-on-write: tensors are views of the file's pages (no copy on load), and a write to
                # one (training a loaded model) copies that page privately, never reaching the file
                self.buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            except ValueError:  # an empty file cannot be mapped
                raise CheckpointError(f"{path}: not a GGUF file (empty)") from None
        self.size = len(self.buf)
        self.pos = 0
        if self.size < 24 or self._scalar("<I") != g.GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic number)")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version}; ouvert reads versions 2 and 3")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar("<Q") for _ in range(self._scalar("<I"))]
            infos.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        align = int(self.fields.get("general.alignment", g.GGUF_DEFAULT_ALIGNMENT))
        start = -(-self.pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, qtype, offset in infos:
            try:
                block, size = g.GGML_QUANT_SIZES[g.GGMLQuantizationType(qtype)]
            except (ValueError, KeyError):
                raise CheckpointError(f"{path}: tensor {name!r} has unknown GGML type {qtype}") from None
            shape = tuple(reversed(dims))
            n = math.prod(dims) * size // block
            begin = start + offset
            if begin + n > self.size:
                raise CheckpointError(f"{path}: tensor {name!r} runs past the end of the file; it may be truncated")
            raw = np.frombuffer(self.buf, dtype=np.uint8, count=n, offset=begin)
            if qtype in (0, 1):  # F32, F16
                raw = raw.view("<f4" if qtype == 0 else "<f2").reshape(shape)
            else:
                raw = raw.reshape(*shape[:-1], -1) if shape else raw
            self.tensors[name] = GGUFTensor(name, qtype, shape, raw)

    def _scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > self.size:
            raise CheckpointError(f"{self.path}: the header ends early; the file may be truncated")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def _string(self) -> str:
        n = self._scalar("<Q")
        if self.pos + n > self.size:
            raise CheckpointError(f"{self.path}: the header ends early; the file may be truncated")
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == 8:
            return self._string()
        if vtype == 9:
            sub, n = self._scalar("<I"), self._scalar("<Q")
            if sub in _NUMPY:
                arr = np.frombuffer(self.buf, dtype=_NUMPY[sub], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self._value(sub) for _ in range(n)]
        if vtype not in _SCALARS:
            raise CheckpointError(f"{self.path}: metadata value of unknown type {vtype}")
        v = self._scalar(_SCALARS[vtype])
        return float(str(np.float32(v))) if vtype == 6 else v  # float32 1e-5 reads back as 1e-5
