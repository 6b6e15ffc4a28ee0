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

A file is untrusted: every size it declares is checked against the bytes it holds before
anything is allocated (a zip record may inflate at most ``MAX_INFLATION`` times its compressed
bytes; a legacy storage must fit in the rest of the file; the pickle is at most
``MAX_PICKLE_BYTES``), and adjax.io.torch_tensors bounds the arrays built from the storages.
Whatever is wrong is raised as one ``CheckpointError`` (an adjax UserError) naming the file.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

from adjax.io.torch_tensors import materialise, storage_bytes
from adjax.io.torch_unpickler import (MAX_DEPTH, CheckpointError, ScriptObject,
                                      UnsafeCheckpointError, _Storage, _unpickle)

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "load_torch_file",
    "load_torch_state_dict",
    "flatten_state",
]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# A checkpoint's pickle holds the structure, not the tensor bytes: megabytes at most.
MAX_PICKLE_BYTES = 256 << 20
# torch stores records uncompressed; a deflated one (re-zipped by a tool) of real weights
# shrinks little, so a record that claims to inflate further is a zip bomb.
MAX_INFLATION = 64
_INFLATION_SLACK = 1 << 20
# flatten_state walks at most this many nodes and builds at most this many name characters:
# a pickle that shares one container from many places would otherwise name exponentially many.
MAX_NODES = 1_000_000
MAX_NAME_CHARS = 64 << 20


def _read_member(path: str, zf: zipfile.ZipFile, name: str, expected: int | None,
                 cap: int, what: str, file_bytes: int) -> bytes:
  """A zip member's bytes, refused before reading if its sizes do not add up.

  ``expected`` is the size the checkpoint declares for it (None: the member's own size, at
  most ``cap``). Only ``expected`` bytes are read, so a member that inflates past its declared
  size costs nothing.
  """
  try:
    info = zf.getinfo(name)
  except KeyError:
    raise CheckpointError(f"{path}: {what} '{name}' is missing (corrupt file)") from None
  if info.header_offset + info.compress_size > file_bytes:
    raise CheckpointError(f"{path}: {what} '{name}' claims {info.compress_size} bytes past the "
                          f"end of the file ({file_bytes} bytes; truncated or corrupt)")
  if info.compress_type == zipfile.ZIP_STORED:
    room = info.compress_size
  else:
    room = MAX_INFLATION * info.compress_size + _INFLATION_SLACK
  want = info.file_size if expected is None else expected
  if want > cap or info.file_size > room:
    raise CheckpointError(
        f"{path}: {what} '{name}' declares {max(want, info.file_size)} bytes from "
        f"{info.compress_size} compressed bytes (limit {min(cap, room)}); refusing a hostile or "
        "corrupt file")
  if info.file_size < want:
    raise CheckpointError(f"{path}: {what} '{name}' has {info.file_size} bytes, expected {want} "
                          "(truncated)")
  with zf.open(info) as f:
    raw = f.read(want + 1 if expected is None else want)
  if len(raw) != want:
    raise CheckpointError(f"{path}: {what} '{name}' holds {len(raw)} bytes, not the {want} it "
                          "declares (truncated or corrupt)")
  return raw


def _load_zip(path: str, zf: zipfile.ZipFile, file_bytes: int) -> Any:
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
    raw = _read_member(path, zf, prefix + "byteorder", None, 16, "record", file_bytes)
    byteorder = raw.decode("ascii", "replace").strip() or "little"

  def load_record(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    raw = _read_member(path, zf, f"{prefix}data/{key}", numel * dtype.itemsize,
                       MAX_INFLATION * file_bytes + _INFLATION_SLACK, "storage record",
                       file_bytes)
    arr = np.frombuffer(raw, dtype=dtype, count=numel)
    if byteorder == "big" and dtype.itemsize > 1:
      arr = arr.byteswap()
    return arr

  storages: dict[str, _Storage] = {}
  pickled = _read_member(path, zf, pickles[0], None, MAX_PICKLE_BYTES, "pickle", file_bytes)
  obj = _unpickle(io.BytesIO(pickled), path=path, storages=storages,
                  load_record=load_record, allow_script_objects=is_script)
  for storage in storages.values():  # byte storages are byte-swapped once their dtype is known
    storage.big_endian = byteorder == "big"
  obj = materialise(obj, path, storage_bytes(storages))
  if is_script:
    return flatten_state(obj, path=path)
  return obj


def _read_exact(f: BinaryIO, n: int, path: str, what: str) -> bytes:
  raw = f.read(n)
  if len(raw) != n:
    raise CheckpointError(f"{path}: file ends inside {what} (truncated: {len(raw)} of {n} bytes)")
  return raw


class _Bounded:
  """The file as the unpickler sees it: a read never asks for more than the file has left, so a
  counted opcode that declares 2**62 bytes reads what is there and fails, allocating nothing."""

  def __init__(self, f: BinaryIO, size: int):
    self._f = f
    self._size = size

  def left(self) -> int:
    return max(0, self._size - self._f.tell())

  def read(self, n: int = -1) -> bytes:
    return self._f.read(self.left() if n is None or n < 0 else min(n, self.left()))

  def readline(self, limit: int = -1) -> bytes:
    return self._f.readline(limit)


def _load_legacy(path: str, f: BinaryIO) -> Any:
  f = _Bounded(f, os.fstat(f.fileno()).st_size)  # type: ignore[assignment]
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
    if not isinstance(key, (str, int)):
      raise CheckpointError(f"{path}: corrupt legacy checkpoint (a storage key of type "
                            f"{type(key).__name__})")
    key = str(key)
    storage = storages.get(key)
    if storage is None:
      raise CheckpointError(f"{path}: storage {key!r} listed but never used (corrupt file)")
    (numel,) = struct.unpack("<q", _read_exact(f, 8, path, f"the size of storage {key!r}"))
    nbytes = numel * storage.dtype.itemsize
    if numel < 0 or nbytes > f.left():  # before reading: f.read(2**62) would try to allocate it
      raise CheckpointError(
          f"{path}: storage {key!r} declares {numel} elements ({nbytes} bytes) but the file has "
          f"{f.left()} bytes left (truncated or corrupt)")
    raw = _read_exact(f, nbytes, path, f"storage {key!r}")
    storage.data = np.frombuffer(raw, dtype=storage.dtype, count=numel)
  for storage in storages.values():  # legacy views share their parent's bytes
    parent = getattr(storage, "parent", None)
    if parent is not None and parent[0].data is not None:
      base, offset = parent
      storage.data = base.data[offset: offset + storage.numel]
  return materialise(obj, path, storage_bytes(storages))


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
    if head[:2] != b"PK" and head[:1] != b"\x80":
      raise CheckpointError(
          f"{path}: not a PyTorch checkpoint (expected a zip archive or a legacy pickle; the "
          f"file starts with {head!r})")
    try:
      if head[:1] == b"\x80":
        return _load_legacy(path, f)
      with zipfile.ZipFile(f) as zf:
        return _load_zip(path, zf, os.fstat(f.fileno()).st_size)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # A hostile zip can make zipfile raise nearly anything (BadZipFile, zlib.error,
      # NotImplementedError for an unknown compression, RuntimeError for encryption,
      # struct.error, OverflowError ...): all mean the same to the user.
      raise CheckpointError(
          f"{path}: a checkpoint that cannot be read ({type(e).__name__}: "
          f"{str(e)[:200]}); the file is truncated or corrupt") from None


def flatten_state(obj: Any, prefix: str = "", *, path: str = "") -> dict[str, np.ndarray]:
  """Flatten nested dicts / TorchScript records into ``{dotted.name: array}``.

  Non-array leaves (bools, numbers, strings, None) are dropped: a state dict holds arrays.

  Args:
    obj: what ``load_torch_file`` returned (or a part of it).
    prefix: name prefix for the keys.
    path: the file it came from, for messages.

  Returns:
    A flat dict of numpy arrays.

  Raises:
    CheckpointError: the tree nests past MAX_DEPTH, or would give more than MAX_NODES nodes
      or MAX_NAME_CHARS characters of names (a container shared from many places).
  """
  where = f"{path}: " if path else ""
  out: dict[str, np.ndarray] = {}
  todo = [(obj, prefix, 0)]
  nodes = chars = 0
  while todo:  # a stack, not recursion: depth is bounded below, not by Python's limit
    node, name, depth = todo.pop()
    nodes += 1
    chars += len(name)
    if depth > MAX_DEPTH or nodes > MAX_NODES or chars > MAX_NAME_CHARS:
      raise CheckpointError(
          f"{where}the checkpoint's tree nests past {MAX_DEPTH} levels or names past "
          f"{MAX_NODES} entries (hostile or corrupt)")
    if isinstance(node, np.ndarray):
      out[name.rstrip(".")] = node
      continue
    items: Any
    if isinstance(node, ScriptObject):
      items = node.state.items()
    elif isinstance(node, dict):
      items = node.items()
    elif isinstance(node, (list, tuple)):
      items = enumerate(node)
    else:
      continue
    todo.extend((v, f"{name}{k}.", depth + 1) for k, v in reversed(list(items)))
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
  flat = flatten_state(obj, path=os.fspath(path))
  if not flat:
    raise CheckpointError(f"{os.fspath(path)}: the checkpoint holds no tensors")
  return flat
