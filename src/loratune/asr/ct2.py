"""Reader of CTranslate2's ``model.bin`` (binary versions 1-6), with numpy only.

Layout, as written by ``ctranslate2.specs.model_spec.ModelSpec._serialize`` and read by the C++
``models::Model::load`` (little endian; a *string* is ``uint16 length`` incl. the NUL, bytes, NUL)::

    uint32 binary_version
    string spec_name ; uint32 spec_revision                 # binary_version >= 2
    uint32 num_variables, then per variable:
        string name ; uint8 rank ; uint32 dims[rank]
        uint8 dtype_id ; uint32 num_bytes                    # binary_version >= 4
        (uint8 item_size ; uint32 num_elements                # binary_version <= 3)
        bytes data[num_bytes]                                # row-major
    uint32 num_aliases, then (string alias, string target)  # binary_version >= 3

dtype ids follow ctranslate2's ``DataType`` enum: float32, int8, int16, int32, float16, bfloat16.
Quantised weights ``X`` come with ``X_scale`` (int8: one float32 per output row,
``X = X_int8 / scale[:, None]``; int16: one scalar) — :func:`dequantize` undoes that.

Usage: ``ckpt = read_model_bin("model.bin"); ckpt.spec, ckpt.float_variables()["decoder/embeddings/weight"]``.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict

import numpy as np

from loratune.errors import ModelError

MAX_BINARY_VERSION = 6
# index = dtype id (ctranslate2 include/ctranslate2/types.h); bfloat16 is read as raw uint16.
DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_NUMPY = {"float32": np.float32, "int8": np.int8, "int16": np.int16, "int32": np.int32, "float16": np.float16, "bfloat16": np.uint16}
_LEGACY_ITEM_SIZE = {4: "float32", 2: "int16", 1: "int8"}  # the reader's guess for binary_version < 4


@dataclass
class CT2Checkpoint:
    """Variables of one ``model.bin``: arrays are read-only views on the mapped file."""

    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: Dict[str, np.ndarray] = field(default_factory=dict)
    dtypes: Dict[str, str] = field(default_factory=dict)
    aliases: Dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def raw(self, name: str) -> np.ndarray:
        """The stored array of ``name`` (aliases followed), bfloat16 as uint16."""
        return self.variables[self.aliases.get(name, name)]

    def dtype(self, name: str) -> str:
        return self.dtypes[self.aliases.get(name, name)]

    def get(self, name: str) -> np.ndarray:
        """``name`` as float32, dequantised with its ``_scale`` sibling when it has one."""
        return dequantize(self, name)

    def names(self) -> list[str]:
        return sorted(set(self.variables) | set(self.aliases))

    def weight_dtype(self) -> str:
        """Storage type of the big matrices: ``float16``, ``int8`` ... (the checkpoint's quantisation)."""
        for name in ("decoder/layer_0/ffn/linear_0/weight", "decoder/embeddings/weight"):
            if name in self:
                return self.dtype(name)
        return "float32"


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def dequantize(ckpt: CT2Checkpoint, name: str) -> np.ndarray:
    """Float32 copy of a variable; int8/int16 weights are divided by their ``<name>_scale``."""
    dtype = ckpt.dtype(name)
    value = ckpt.raw(name)
    if dtype == "bfloat16":
        return _bf16_to_f32(value)
    value = value.astype(np.float32)
    scale_name = name + "_scale"
    if dtype in ("int8", "int16") and scale_name in ckpt:
        scale = ckpt.get(scale_name)
        if scale.ndim == 0 or scale.size == 1:
            return value / float(scale.reshape(()))
        # per-output-row scale (conv weights [out, in, k] are quantised as [out, in*k])
        return value / scale.reshape((-1,) + (1,) * (value.ndim - 1))
    return value


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if start + n > self.size:
            raise ModelError(
                f"{self.path}: truncated CTranslate2 model.bin ({self.size:,} bytes; {what} needs bytes up to "
                f"{start + n:,}); re-download or re-assemble the file"
            )
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)

    def string(self, what: str) -> str:
        (length,) = self.unpack("<H", what)
        start = self.take(length, what)
        raw = bytes(self.buf[start:start + length])
        if length == 0 or raw[-1] != 0:
            raise ModelError(f"{self.path}: not a CTranslate2 model.bin (bad string at byte {start}); pass the model.bin of a CTranslate2 checkpoint")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"{self.path}: not a CTranslate2 model.bin (non-text name at byte {start})") from None


def read_model_bin(path: str | Path) -> CT2Checkpoint:
    """Parse ``path`` (a CTranslate2 ``model.bin``); ModelError on a wrong, truncated or padded file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise ModelError(f"{path}: file not found; point at a CTranslate2 checkpoint directory holding model.bin")
    size = path.stat().st_size
    if size < 16:
        raise ModelError(f"{path}: {size} bytes is too small for a CTranslate2 model.bin (truncated or empty file)")
    with open(path, "rb") as fh:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf, path)
    (version,) = cur.unpack("<I", "header")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise ModelError(
            f"{path}: not a CTranslate2 model.bin (binary version {version}, expected 1-{MAX_BINARY_VERSION}); "
            "pass the model.bin of a CTranslate2 checkpoint"
        )
    spec, revision = "", 1
    if version >= 2:
        spec = cur.string("spec name")
        (revision,) = cur.unpack("<I", "spec revision")
    ckpt = CT2Checkpoint(path=path, binary_version=version, spec=spec, revision=revision)
    (count,) = cur.unpack("<I", "variable count")
    for _ in range(count):
        name = cur.string("variable name")
        (rank,) = cur.unpack("<B", name)
        dims = cur.unpack(f"<{rank}I", name) if rank else ()
        if version >= 4:
            dtype_id, num_bytes = cur.unpack("<BI", name)
            if dtype_id >= len(DTYPES):
                raise ModelError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}; file is corrupt or from a newer CTranslate2")
            dtype = DTYPES[dtype_id]
        else:
            item_size, num_elements = cur.unpack("<BI", name)
            if item_size not in _LEGACY_ITEM_SIZE:
                raise ModelError(f"{path}: variable {name!r} has item size {item_size}; file is corrupt")
            dtype, num_bytes = _LEGACY_ITEM_SIZE[item_size], num_elements * item_size
        np_dtype = np.dtype(_NUMPY[dtype])
        expected = int(np.prod(dims, dtype=np.int64)) * np_dtype.itemsize
        if expected != num_bytes:
            raise ModelError(f"{path}: variable {name!r} shape {list(dims)} x {dtype} needs {expected} bytes, header says {num_bytes}; file is corrupt")
        start = cur.take(num_bytes, f"variable {name!r}")
        ckpt.variables[name] = np.frombuffer(buf, dtype=np_dtype, count=num_bytes // np_dtype.itemsize, offset=start).reshape(dims)
        ckpt.dtypes[name] = dtype
    if version >= 3:
        (num_aliases,) = cur.unpack("<I", "alias count")
        for _ in range(num_aliases):
            alias = cur.string("alias")
            ckpt.aliases[alias] = cur.string("alias target")
        missing = sorted(t for t in ckpt.aliases.values() if t not in ckpt.variables)
        if missing:
            raise ModelError(f"{path}: aliases point at missing variables {missing[:3]}; file is corrupt")
    if cur.pos != size:
        raise ModelError(f"{path}: {size - cur.pos:,} unexpected bytes after the last record; not a single intact CTranslate2 model.bin")
    return ckpt


def scalar(ckpt: CT2Checkpoint, name: str, default=None):
    """Python value of a rank-0 variable such as ``encoder/num_heads`` (None/default when absent)."""
    if name not in ckpt:
        return default
    return ckpt.raw(name).reshape(-1)[0].item()
