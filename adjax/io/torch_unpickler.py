"""The restricted unpickler of adjax.io.torch_pickle: the only globals a checkpoint of weights
may name, each replaced by our own inert code, and the tensors rebuilt from storage records
(see torch_pickle's docstring for what is accepted and why)."""

from __future__ import annotations

import collections
import pickle
import struct
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np


# Typed storage class name -> numpy dtype of its elements.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}


# torch dtype name (``torch.<name>``, given to ``_rebuild_tensor_v3``) -> numpy dtype. torch
# pickles tensors of the dtypes that have no typed storage class (float8, uint16/32/64) as an
# untyped byte storage plus this dtype.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64), "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "int64": np.dtype(np.int64), "int32": np.dtype(np.int32), "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint64": np.dtype(np.uint64), "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128),
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):  # ml_dtypes >= 0.5
  _TORCH_DTYPES["float8_e8m0fnu"] = np.dtype(ml_dtypes.float8_e8m0fnu)
# torch dtypes without a numpy equivalent here (packed sub-byte, quantised, complex32): a file
# holding them is refused as unsupported, not as unsafe.
_UNSUPPORTED_TORCH_DTYPES = frozenset({
    "complex32", "float4_e2m1fn_x2", "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
    "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16", "float8_e8m0fnu",
    *(f"int{n}" for n in range(1, 8)), *(f"uint{n}" for n in range(1, 8)),
})


class CheckpointError(ValueError):
  """A checkpoint file is unreadable: truncated, corrupt or of an unknown layout."""


class UnsafeCheckpointError(CheckpointError):
  """A checkpoint's pickle names something other than tensors and plain containers."""


class _StorageType:
  """Stands for ``torch.<X>Storage`` inside the pickle: only carries the element dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _TorchDtype:
  """Stands for ``torch.<dtype>`` inside the pickle: the numpy dtype, or None if unsupported."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _TORCH_DTYPES.get(name)


class _Storage:
  """One storage record: a flat numpy array, filled when its bytes are read."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key = key
    self.dtype = dtype
    self.numel = numel
    self.data: np.ndarray | None = None
    self.big_endian = False  # set for zip records written on a big-endian machine


class _TensorRef:
  """A tensor view into a storage; turned into a numpy array once all storages are read."""

  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple,
               dtype: np.dtype | None = None):
    self.storage = storage
    self.offset = int(offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)
    self.dtype = dtype  # element type of an untyped (byte) storage; None for typed storages

  def materialise(self, path: str) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise CheckpointError(f"{path}: storage {self.storage.key!r} was never read (corrupt file)")
    if self.dtype is not None and self.dtype != data.dtype:
      # Offsets and strides count elements of the tensor's dtype, so view the bytes as it.
      if data.dtype != np.uint8:
        raise CheckpointError(
            f"{path}: a {self.dtype.name} tensor points into storage {self.storage.key!r} of "
            f"{data.dtype.name} elements (corrupt file)")
      if data.nbytes % self.dtype.itemsize:
        raise CheckpointError(
            f"{path}: storage {self.storage.key!r} of {data.nbytes} bytes does not hold whole "
            f"{self.dtype.name} elements (corrupt file)")
      data = data.view(self.dtype)
      if self.storage.big_endian and self.dtype.itemsize > 1:
        data = data.byteswap()
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, data.dtype)
    last = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride))
    if self.offset < 0 or last >= data.size or any(st < 0 for st in self.stride):
      raise CheckpointError(
          f"{path}: tensor of shape {self.size} at offset {self.offset} runs past its storage "
          f"{self.storage.key!r} of {data.size} elements (corrupt file)")
    # as_strided goes through __array_interface__, which cannot describe some ml_dtypes types
    # (float8): stride over their bytes as same-width unsigned ints, then view them back.
    raw = data if data.dtype.isbuiltin == 1 else data.view(f"u{data.itemsize}")
    view = np.lib.stride_tricks.as_strided(
        raw[self.offset:], shape=self.size,
        strides=tuple(st * data.itemsize for st in self.stride), writeable=False)
    return np.array(view).view(data.dtype)  # own the memory, contiguous


class ScriptObject:
  """Inert record of a TorchScript object (``__torch__.*`` class): its name and attributes."""

  def __init__(self, qualname: str):
    self.qualname = qualname
    self.state: dict[str, Any] = {}

  def __setstate__(self, state: Any) -> None:
    # BUILD opcode: TorchScript passes the attribute dict. Anything else is kept as is.
    self.state = state if isinstance(state, dict) else {"__state__": state}

  def __repr__(self) -> str:
    return f"ScriptObject({self.qualname!r})"


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  if not isinstance(storage, _Storage):
    raise UnsafeCheckpointError("tensor rebuild got something other than a storage record")
  return _TensorRef(storage, storage_offset, size, stride)


class _UnsupportedDtype(CheckpointError):
  """Raised inside the unpickler; ``_unpickle`` names the file in the message."""

  def __init__(self, name: str):
    super().__init__(name)
    self.dtype_name = name


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad=None,
                       backward_hooks=None, dtype=None, *unused):
  """``torch._utils._rebuild_tensor_v3``: an untyped byte storage plus the tensor's dtype."""
  del requires_grad, backward_hooks
  if not isinstance(storage, _Storage):
    raise UnsafeCheckpointError("tensor rebuild got something other than a storage record")
  if not isinstance(dtype, _TorchDtype):
    raise UnsafeCheckpointError(f"tensor rebuild got {type(dtype).__name__}, not a torch dtype")
  if dtype.dtype is None:
    raise _UnsupportedDtype(dtype.name)
  return _TensorRef(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  del requires_grad, backward_hooks
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  # Tensor subclasses: only plain Tensor / Parameter are accepted (new_type is our marker).
  del state
  if new_type is not _TENSOR_MARKER or func not in (_rebuild_tensor, _rebuild_tensor_v3,
                                                    _rebuild_parameter):
    raise UnsafeCheckpointError("tensor of an unknown subclass")
  return func(*args)


def _identity_first(value, *unused):
  return value


_TENSOR_MARKER = object()

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TENSOR_MARKER,
    ("torch.nn.parameter", "Parameter"): _TENSOR_MARKER,
}

# Pure helpers TorchScript's pickler may emit for typed lists and type tags.
_JIT_HELPERS = {"restore_type_tag", "build_intlist", "build_tensorlist", "build_doublelist",
                "build_boollist"}


class _RestrictedUnpickler(pickle.Unpickler):
  """An Unpickler that resolves only allow-listed globals and storage persistent ids."""

  def __init__(self, file: BinaryIO, *, path: str, storages: dict[str, _Storage],
               load_record=None, allow_script_objects: bool = False):
    super().__init__(file)
    self._path = path
    self._storages = storages
    self._load_record = load_record
    self._allow_script = allow_script_objects

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and (name in _TORCH_DTYPES or name in _UNSUPPORTED_TORCH_DTYPES):
      return _TorchDtype(name)  # inert: only read by _rebuild_tensor_v3
    if self._allow_script:
      if module == "torch.jit._pickle" and name in _JIT_HELPERS:
        return _identity_first
      if module == "__torch__" or module.startswith("__torch__."):
        qualname = f"{module}.{name}"
        return type(name, (ScriptObject,), {"__new__": lambda cls, *a: _new_script(cls, qualname)})
    raise UnsafeCheckpointError(
        f"{self._path}: refusing to load: the pickle asks for '{module}.{name}', which is not a "
        "tensor or a plain container. Only weights are read from checkpoints; a file that needs "
        "other objects may run arbitrary code and is not loaded.")

  def persistent_load(self, pid: Any) -> Any:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise UnsafeCheckpointError(f"{self._path}: unknown persistent id {pid!r:.80}")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]   # pid[3]: the device, unused
    if not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(f"{self._path}: storage of unknown type {storage_type!r:.80}")
    dtype = storage_type.dtype
    if key not in self._storages:
      storage = _Storage(key, dtype, int(numel))
      if storage_type.name == "UntypedStorage":
        storage.numel = int(numel)  # bytes
      if self._load_record is not None:
        storage.data = self._load_record(key, dtype, storage.numel)
      self._storages[key] = storage
    storage = self._storages[key]
    view_meta = pid[5] if len(pid) > 5 else None
    if view_meta is not None:  # legacy views into a larger storage: (view_key, offset, size)
      _, offset, size = view_meta
      view = _Storage(f"{key}[{offset}:{offset + size}]", dtype, int(size))
      view.data = None
      # Resolved after the storage bytes are read (legacy format only).
      view.parent = (storage, int(offset))  # type: ignore[attr-defined]
      self._storages.setdefault(view.key, view)
      return self._storages[view.key]
    return storage


def _new_script(cls, qualname: str) -> ScriptObject:
  obj = object.__new__(cls)
  ScriptObject.__init__(obj, qualname)
  return obj


def _materialise(obj: Any, path: str) -> Any:
  """Replace every ``_TensorRef`` by its numpy array, recursively through containers."""
  if isinstance(obj, _TensorRef):
    return obj.materialise(path)
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _materialise(v, path)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _materialise(v, path) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_materialise(v, path) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialise(v, path) for v in obj)
  if isinstance(obj, ScriptObject):
    obj.state = {k: _materialise(v, path) for k, v in obj.state.items()}
    return obj
  return obj


def _unpickle(data: BinaryIO, **kwargs) -> Any:
  path = kwargs["path"]
  try:
    return _RestrictedUnpickler(data, **kwargs).load()
  except _UnsupportedDtype as e:
    raise CheckpointError(
        f"{path}: unsupported tensor dtype torch.{e.dtype_name} (no numpy equivalent to read "
        "it into); convert the checkpoint to a float dtype first") from None
  except CheckpointError:
    raise
  except (EOFError, pickle.UnpicklingError, struct.error, ValueError, TypeError, KeyError,
          IndexError, AttributeError, MemoryError) as e:
    raise CheckpointError(
        f"{path}: cannot read the checkpoint's pickle ({type(e).__name__}: {e}); the file is "
        "truncated or corrupt") from e
