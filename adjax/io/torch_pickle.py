"""Read PyTorch checkpoints (.pth/.pt) without torch and without running pickled code.

PyTorch checkpoints are pickles. A plain ``pickle.load`` would call whatever the file names
(``os.system`` included), so this reader uses a restricted ``Unpickler`` whose ``find_class``
answers only for the few names a checkpoint of weights needs:

- ``collections.OrderedDict`` (state dicts are OrderedDicts);
- the tensor rebuild functions of ``torch._utils`` / ``torch._tensor`` and the typed storage
  classes (``torch.FloatStorage`` ...), which are replaced by our own code that rebuilds a numpy
  array from the raw bytes of the storage record;
- the dtype names (``torch.float8_e4m3fn``, ``torch.uint16`` ...) that ``_rebuild_tensor_v3``
  gets for tensors without a typed storage class (float8, uint16/32/64), replaced by inert
  markers; a dtype numpy cannot hold (sub-byte, quantised) is refused as unsupported;
- in TorchScript archives only (OpenAI CLIP ``.pt`` files), ``__torch__.*`` classes, replaced by
  an inert record that keeps the module's attributes (no TorchScript code is read or run), and
  a few pure list/type-tag helpers of ``torch.jit._pickle``.

Every other global is refused with ``UnsafeCheckpointError`` before anything is called. Dicts,
lists, tuples, strings, numbers and bools are built by pickle opcodes themselves.

Three container layouts are read:
- the zip format of ``torch.save`` (PyTorch >= 1.6): ``<dir>/data.pkl`` plus one record
  ``<dir>/data/<key>`` per storage;
- TorchScript archives (``torch.jit.save``): the same zip layout with ``code/`` and
  ``constants.pkl`` beside it; only ``data.pkl`` is read and it is flattened to a state dict;
- the legacy format (PyTorch < 1.6, e.g. the EfficientNet-Lite0 file): a magic-number pickle, a
  protocol pickle, a system-info pickle, the object pickle, a pickle listing storage keys, then
  each storage as an 8-byte element count followed by its raw bytes.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from typing import Any, BinaryIO

import numpy as np

from adjax.io.torch_unpickler import (CheckpointError, ScriptObject, UnsafeCheckpointError,
                                      _materialise, _Storage, _unpickle)

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "load_torch_file",
    "load_torch_state_dict",
    "flatten_state",
]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

def _load_zip(path: str, zf: zipfile.ZipFile) -> Any:
  names = zf.namelist()
  pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
  if not pickles:
    pickles = [n for n in names if n == "data.pkl"]
  if len(pickles) != 1:
    raise CheckpointError(
        f"{path}: a zip file but not a PyTorch checkpoint (expected one '<dir>/data.pkl', "
        f"found {len(pickles)})")
  prefix = pickles[0][: -len("data.pkl")]
  is_script = (prefix + "constants.pkl") in names or any(
      n.startswith(prefix + "code/") for n in names)
  byteorder = "little"
  if prefix + "byteorder" in names:
    byteorder = zf.read(prefix + "byteorder").decode().strip() or "little"

  def load_record(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    name = f"{prefix}data/{key}"
    try:
      raw = zf.read(name)
    except KeyError as e:
      raise CheckpointError(f"{path}: storage record '{name}' is missing (corrupt file)") from e
    nbytes = numel * dtype.itemsize
    if len(raw) < nbytes:
      raise CheckpointError(
          f"{path}: storage record '{name}' has {len(raw)} bytes, expected {nbytes} (truncated)")
    arr = np.frombuffer(raw, dtype=dtype, count=numel)
    if byteorder == "big" and dtype.itemsize > 1:
      arr = arr.byteswap()
    return arr

  storages: dict[str, _Storage] = {}
  obj = _unpickle(io.BytesIO(zf.read(pickles[0])), path=path, storages=storages,
                  load_record=load_record, allow_script_objects=is_script)
  for storage in storages.values():  # byte storages are byte-swapped once their dtype is known
    storage.big_endian = byteorder == "big"
  obj = _materialise(obj, path)
  if is_script:
    return flatten_state(obj)
  return obj


def _read_exact(f: BinaryIO, n: int, path: str, what: str) -> bytes:
  raw = f.read(n)
  if len(raw) != n:
    raise CheckpointError(f"{path}: file ends inside {what} (truncated: {len(raw)} of {n} bytes)")
  return raw


def _load_legacy(path: str, f: BinaryIO) -> Any:
  common = dict(path=path, storages={})
  magic = _unpickle(f, **common)
  if magic != _LEGACY_MAGIC:
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (no zip header, no legacy magic)")
  protocol = _unpickle(f, **common)
  if protocol != _LEGACY_PROTOCOL:
    raise CheckpointError(f"{path}: unsupported legacy protocol version {protocol!r}")
  sys_info = _unpickle(f, **common)
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise CheckpointError(f"{path}: big-endian legacy checkpoints are not supported")
  storages: dict[str, _Storage] = {}
  obj = _unpickle(f, path=path, storages=storages)
  keys = _unpickle(f, path=path, storages={})
  if not isinstance(keys, list):
    raise CheckpointError(f"{path}: corrupt legacy checkpoint (storage key list)")
  for key in keys:
    key = str(key)
    storage = storages.get(key)
    if storage is None:
      raise CheckpointError(f"{path}: storage {key!r} listed but never used (corrupt file)")
    (numel,) = struct.unpack("<q", _read_exact(f, 8, path, f"the size of storage {key!r}"))
    nbytes = numel * storage.dtype.itemsize
    raw = _read_exact(f, nbytes, path, f"storage {key!r}")
    storage.data = np.frombuffer(raw, dtype=storage.dtype, count=numel)
  for storage in storages.values():  # legacy views share their parent's bytes
    parent = getattr(storage, "parent", None)
    if parent is not None and parent[0].data is not None:
      base, offset = parent
      storage.data = base.data[offset: offset + storage.numel]
  return _materialise(obj, path)


def load_torch_file(path: str | os.PathLike) -> Any:
  """Load a PyTorch checkpoint as numpy arrays inside plain containers.

  Args:
    path: a ``.pth``/``.pt`` file written by ``torch.save`` (zip or legacy format) or
      ``torch.jit.save`` (TorchScript archive).

  Returns:
    The pickled object with every tensor as a numpy array (bfloat16 as ``ml_dtypes.bfloat16``).
    A TorchScript archive is returned flattened as a ``{dotted name: array}`` dict, like its
    ``state_dict()``.

  Raises:
    FileNotFoundError: the path does not exist.
    UnsafeCheckpointError: the pickle names anything other than tensors and plain containers.
    CheckpointError: the file is truncated, corrupt or not a PyTorch checkpoint.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  with open(path, "rb") as f:
    head = f.read(4)
    f.seek(0)
    if head[:2] == b"PK":
      try:
        zf = zipfile.ZipFile(f)
      except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: a zip checkpoint that cannot be opened ({e}); the file is truncated or "
            "corrupt") from e
      with zf:
        try:
          return _load_zip(path, zf)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
          raise CheckpointError(f"{path}: corrupt zip record ({e})") from e
    if head[:1] == b"\x80":
      return _load_legacy(path, f)
  raise CheckpointError(
      f"{path}: not a PyTorch checkpoint (expected a zip archive or a legacy pickle; the file "
      f"starts with {head!r})")


def flatten_state(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """Flatten nested dicts / TorchScript records into ``{dotted.name: array}``.

  Non-array leaves (bools, numbers, strings, None) are dropped: a state dict holds arrays.

  Args:
    obj: what ``load_torch_file`` returned (or a part of it).
    prefix: name prefix for the keys.

  Returns:
    A flat dict of numpy arrays.
  """
  out: dict[str, np.ndarray] = {}
  if isinstance(obj, np.ndarray):
    out[prefix.rstrip(".")] = obj
    return out
  items: Any
  if isinstance(obj, ScriptObject):
    items = obj.state.items()
  elif isinstance(obj, dict):
    items = obj.items()
  elif isinstance(obj, (list, tuple)):
    items = ((str(i), v) for i, v in enumerate(obj))
  else:
    return out
  for k, v in items:
    out.update(flatten_state(v, f"{prefix}{k}."))
  return out


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Load a checkpoint and return its flat ``{name: array}`` state dict.

  Args:
    path: a ``.pth``/``.pt`` checkpoint.

  Returns:
    Flat dict of numpy arrays (the tensors found anywhere in the checkpoint, named by their
    dotted path; a plain state dict keeps its own keys).
  """
  obj = load_torch_file(path)
  if isinstance(obj, dict) and all(isinstance(v, np.ndarray) for v in obj.values()):
    return dict(obj)
  flat = flatten_state(obj)
  if not flat:
    raise CheckpointError(f"{os.fspath(path)}: the checkpoint holds no tensors")
  return flat
