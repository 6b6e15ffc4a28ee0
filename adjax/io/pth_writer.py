"""PyTorch's checkpoint format written without torch (numpy only), or with torch when present.

`pth_bytes` writes the zip layout torch.save (>= 1.6) writes; `torch.load(..., weights_only=True)`
and adjax.io.torch_pickle read it back. Files are written atomically (adjax.io.files).
"""

from __future__ import annotations

import collections
import importlib.util
import io
import pickle
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

from adjax.io import files

class _Global:
  """A `module.name` GLOBAL reference written without importing the module (torch)."""

  def __init__(self, module: str, name: str):
    self.module = module
    self.name = name

  def __call__(self, *args):  # pickle's save_reduce wants a callable; never called here
    raise TypeError(f"{self.module}.{self.name} is a name written into a pickle, not a function")


_REBUILD_TENSOR_V2 = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_CLASSES = {
    np.dtype(np.float32): _Global("torch", "FloatStorage"),
    np.dtype(np.float64): _Global("torch", "DoubleStorage"),
    np.dtype(np.float16): _Global("torch", "HalfStorage"),
    np.dtype(np.int64): _Global("torch", "LongStorage"),
    np.dtype(np.int32): _Global("torch", "IntStorage"),
    np.dtype(np.int16): _Global("torch", "ShortStorage"),
    np.dtype(np.int8): _Global("torch", "CharStorage"),
    np.dtype(np.uint8): _Global("torch", "ByteStorage"),
    np.dtype(np.bool_): _Global("torch", "BoolStorage"),
}


class _Storage:
  """One storage record of the archive: `data/<key>` holds the array's raw bytes."""

  def __init__(self, key: str, array: np.ndarray):
    self.key = key
    self.array = array


class _Tensor:
  """Pickles as `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, {})`."""

  def __init__(self, storage: _Storage):
    self.storage = storage

  def __reduce__(self):
    shape = tuple(int(n) for n in self.storage.array.shape)
    stride = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
    return (_REBUILD_TENSOR_V2,
            (self.storage, 0, shape, stride, False, collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is a dict
  """Protocol-2 pickler that writes torch GLOBALs by name and storages as persistent ids."""

  dispatch = dict(pickle._Pickler.dispatch)

  def _save_global_ref(self, obj: _Global) -> None:
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
    self.memoize(obj)

  dispatch[_Global] = _save_global_ref

  def persistent_id(self, obj: Any) -> Any:
    if isinstance(obj, _Storage):
      # What torch.save writes: ("storage", storage class, key, location, element count).
      return ("storage", _STORAGE_CLASSES[obj.array.dtype], obj.key, "cpu",
              int(obj.array.size))
    return None


def _as_records(obj: Any, storages: list[_Storage]) -> Any:
  """Replaces every numpy array in a dict tree by a _Tensor with its own storage."""
  if isinstance(obj, Mapping):
    return collections.OrderedDict((k, _as_records(v, storages)) for k, v in obj.items())
  if isinstance(obj, (np.ndarray, np.generic)):  # numpy scalars become 0-d tensors
    array = np.array(obj, order="C")  # not ascontiguousarray: it turns 0-d into 1-d
    if array.dtype not in _STORAGE_CLASSES:
      raise ValueError(f"cannot write a .pth tensor of dtype {array.dtype}")
    if array.dtype.byteorder == ">":
      array = array.astype(array.dtype.newbyteorder("<"))
    storage = _Storage(str(len(storages)), array)
    storages.append(storage)
    return _Tensor(storage)
  return obj


def _aligned_entry(zf: zipfile.ZipFile, name: str, data: bytes, align: int = 64) -> None:
  """Writes an uncompressed zip entry whose data starts at a multiple of `align` (as torch
  does, so that readers may memory-map storages), padding with an extra field."""
  offset = zf.fp.tell()
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  header = 30 + len(name.encode("utf-8")) + 4  # local header + name + the extra field's head
  pad = -(offset + header) % align
  info.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad  # id "FB", as torch's writer
  zf.writestr(info, data)


def pth_bytes(obj: Mapping[str, Any], archive: str = "archive") -> bytes:
  """PyTorch's zip checkpoint format for a dict tree of numpy arrays, written without torch.

  The layout torch.save (>= 1.6) writes: `archive/data.pkl` (protocol 2; tensors as
  `torch._utils._rebuild_tensor_v2` calls on persistent-id storages), `archive/data/<key>`
  (each storage's raw little-endian bytes), `archive/byteorder` and `archive/version` (3).
  `torch.load(..., weights_only=True)` reads it.

  Args:
    obj: nested dicts whose leaves are numpy arrays (or plain numbers and strings).
    archive: the folder name inside the zip.

  Returns:
    The file's bytes.
  """
  storages: list[_Storage] = []
  tree = _as_records(obj, storages)
  buffer = io.BytesIO()
  _TorchPickler(buffer, protocol=2).dump(tree)
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
    _aligned_entry(zf, f"{archive}/data.pkl", buffer.getvalue())
    _aligned_entry(zf, f"{archive}/byteorder", b"little")
    for storage in storages:
      _aligned_entry(zf, f"{archive}/data/{storage.key}", storage.array.tobytes())
    _aligned_entry(zf, f"{archive}/version", b"3\n")
  return out.getvalue()


def _torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


def write_pth(path: str, obj: Mapping[str, Any], *, use_torch: bool | None = None) -> None:
  """Writes a dict tree of numpy arrays as a PyTorch checkpoint, atomically.

  Args:
    path: the destination .pth file.
    obj: e.g. `{"projectors": state_dict}` with numpy arrays.
    use_torch: True: torch.save; False: our own writer; None: torch when it is installed.
  """
  if use_torch is None:
    use_torch = _torch_available()
  if use_torch:
    import torch  # optional, lazy: the library runs without it

    def to_torch(node):
      if isinstance(node, Mapping):
        return collections.OrderedDict((k, to_torch(v)) for k, v in node.items())
      return torch.from_numpy(np.ascontiguousarray(node)) if isinstance(node, np.ndarray) else node

    payload = to_torch(obj)
    files.atomic_write(path, lambda f: torch.save(payload, f))
  else:
    data = pth_bytes(obj)
    files.atomic_write(path, lambda f: f.write(data))
