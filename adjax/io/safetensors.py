"""Read and write ``.safetensors`` files with numpy only (bfloat16 included).

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the raw little-endian bytes. Reading memory-maps the file,
so only the tensors that are used get paged in. Writing is atomic (temporary file, then rename),
so a crashed or concurrent conversion never leaves a half-written cache file behind.

A file is untrusted: the header must fit in the file and in ``_MAX_HEADER``, parse without
nesting past Python's recursion, and describe each tensor with integer dims >= 0 whose bytes
lie inside the data; ``__metadata__`` must map strings to strings. Anything else is one
``SafetensorsError`` (an adjax UserError) naming the file, and nothing is read beyond the map.
"""
from __future__ import annotations

import json
import os
import reprlib
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

from adjax.errors import UserError
from adjax.io import files

__all__ = ["SafetensorsError", "load_safetensors", "save_safetensors", "read_metadata"]

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024
_short = reprlib.Repr()  # bounded repr of header entries for messages (they may nest deep)
_short.maxlevel, _short.maxstring, _short.maxother = 3, 60, 60


class SafetensorsError(UserError):
  """A ``.safetensors`` file is truncated, corrupt or uses an unknown dtype."""


def _read_header(path: str) -> tuple[dict, int]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise SafetensorsError(f"{path}: too short for a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER, size - 8):
      raise SafetensorsError(
          f"{path}: header length {n} exceeds the file ({size} bytes); truncated or not a "
          "safetensors file")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f"{path}: unreadable safetensors header ({e})") from None
    except RecursionError:  # json.loads recurses once per level of nesting
      raise SafetensorsError(f"{path}: the safetensors header nests too deep to be a header "
                             "(hostile or corrupt)") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path}: safetensors header is not a JSON object")
  return header, 8 + n


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
  """Return the ``__metadata__`` string map of a safetensors file (empty if none).

  Args:
    path: the file.

  Returns:
    Its metadata dict.
  """
  path = os.fspath(path)
  header, _ = _read_header(path)
  metadata = header.get("__metadata__")
  if metadata is None:
    return {}
  if not isinstance(metadata, dict):
    raise SafetensorsError(f"{path}: __metadata__ is a JSON {type(metadata).__name__}, not an "
                           "object of strings")
  for key, value in metadata.items():
    if not isinstance(value, str):
      raise SafetensorsError(f"{path}: __metadata__ key {key[:80]!r} holds a JSON "
                             f"{type(value).__name__}, not a string")
  return dict(metadata)


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Load every tensor of a safetensors file as a read-only numpy array (memory-mapped).

  Args:
    path: the ``.safetensors`` file.

  Returns:
    ``{name: array}`` in the file's order.

  Raises:
    FileNotFoundError: no such file.
    SafetensorsError: truncated/corrupt file or unknown dtype.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file not found: {path}")
  header, start = _read_header(path)
  size = os.path.getsize(path)
  data_len = size - start
  mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_len,)) \
      if data_len > 0 else np.zeros((0,), np.uint8)
  out: dict[str, np.ndarray] = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = _DTYPES[info["dtype"]]
      shape = tuple(info["shape"])
      begin, end = info["data_offsets"]
      # Plain non-negative ints only: int() would truncate 2.5 and accept "12", and numpy's
      # int64 product of large dims wraps around to a size that may look right.
      if not all(type(v) is int and v >= 0 for v in (*shape, begin, end)) or len(shape) > 64:
        raise ValueError("dims and offsets must be integers >= 0")
    except (KeyError, TypeError, ValueError):
      raise SafetensorsError(
          f"{path}: bad header entry for {name[:80]!r}: {_short.repr(info)}") from None
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if end - begin != nbytes or begin < 0:
      raise SafetensorsError(
          f"{path}: tensor {name!r} spans {end - begin} bytes, expected {nbytes} for {shape}")
    if end > data_len:
      raise SafetensorsError(
          f"{path}: tensor {name!r} ends at byte {end} but the data has {data_len} bytes "
          "(truncated file)")
    out[name] = mm[begin:end].view(dtype).reshape(shape)
  return out


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
  """Write tensors to a safetensors file atomically.

  Args:
    path: destination file; its folder is created if needed.
    tensors: ``{name: array}``; arrays are written C-contiguous, little-endian.
    metadata: optional string-to-string map stored under ``__metadata__``.

  Raises:
    SafetensorsError: an array's dtype has no safetensors name.
  """
  path = os.fspath(path)
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  arrays = []
  offset = 0
  for name, value in tensors.items():
    arr = np.ascontiguousarray(np.asarray(value))
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    arr = arr.astype(dtype, copy=False)
    if dtype not in _NAMES:
      raise SafetensorsError(f"cannot write {name!r}: dtype {arr.dtype} has no safetensors name")
    header[name] = {"dtype": _NAMES[dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
  def write(f):
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays:
      f.write(arr.tobytes())

  files.atomic_write(path, write)
