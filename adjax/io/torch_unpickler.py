"""The restricted unpickler of adjax.io.torch_pickle: the only globals a checkpoint of weights
may name, each replaced by our own inert code, and the tensor records it yields (see
torch_pickle's docstring for what is accepted and why; adjax.io.torch_tensors turns the records
into arrays).

It is the pure-Python unpickler, not the C one: the C unpickler sizes its memo by the index a
PUT opcode names (4 bytes: a 30-byte file can make it fill gigabytes) and allocates a counted
string before reading it; the Python one keeps the memo in a dict and reads through the file.
"""

from __future__ import annotations

import collections
import pickle
import reprlib
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from adjax.errors import UserError


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


# Nesting of the pickle's containers (its MARK stack, and the tree the readers walk): state
# dicts nest a handful of levels, TorchScript modules a few dozen; deeper is hostile and would
# exhaust Python's recursion in every walk of the tree.
MAX_DEPTH = 100
MAX_NDIM = 64        # numpy's own limit on the rank of an array
MAX_DIM = 1 << 48    # no dimension of a real tensor is near this; it keeps the arithmetic small
MAX_SCRIPT_CLASSES = 10_000  # distinct __torch__ classes in one TorchScript archive

_short = reprlib.Repr()  # bounded repr for messages: a hostile pid may nest 100,000 deep
_short.maxlevel, _short.maxstring, _short.maxother = 3, 60, 60


class CheckpointError(UserError):
  """A checkpoint file is unreadable: truncated, corrupt, oversized or of an unknown layout."""


class UnsafeCheckpointError(CheckpointError):
  """A checkpoint's pickle names something other than tensors and plain containers."""


class _Corrupt(CheckpointError):
  """Raised where the file's name is not at hand; ``_unpickle`` puts it in front (as for any
  CheckpointError raised without it)."""


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


def _ints(values: Any, what: str) -> tuple[int, ...]:
  if not isinstance(values, (tuple, list)) or len(values) > MAX_NDIM:
    raise _Corrupt(f"tensor {what} is not a tuple of at most {MAX_NDIM} integers (corrupt file)")
  if not all(isinstance(v, int) for v in values):
    raise _Corrupt(f"tensor {what} {_short.repr(values)} holds non-integers (corrupt file)")
  return tuple(int(v) for v in values)


def check_view(numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> str:
  """Why a view (offset, size, stride) does not fit in a storage of ``numel`` elements; "" if
  it fits. The last element it reads, offset + sum((size_i - 1) * stride_i), must lie inside
  the storage, or the view would read memory that is not the file's (or fail deep in numpy)."""
  if len(size) != len(stride):
    return f"tensor has {len(size)} sizes but {len(stride)} strides"
  if offset < 0 or any(n < 0 for n in size) or any(st < 0 for st in stride):
    return f"tensor of shape {size}, strides {stride} at offset {offset} has negative values"
  if any(n > MAX_DIM for n in size) or offset > MAX_DIM or any(st > MAX_DIM for st in stride):
    return f"tensor of shape {size}, strides {stride} at offset {offset} is implausibly large"
  if 0 in size:
    return ""
  last = offset + sum((n - 1) * st for n, st in zip(size, stride))
  if last >= numel:
    return (f"tensor of shape {size}, strides {stride} at offset {offset} reads element {last} "
            f"of a storage of {numel} elements")
  return ""


class _TensorRef:
  """A tensor view into a storage; turned into a numpy array once all storages are read."""

  def __init__(self, storage: _Storage, offset: int, size: Any, stride: Any,
               dtype: np.dtype | None = None):
    if not isinstance(offset, int):
      raise _Corrupt(f"tensor storage offset {_short.repr(offset)} is not an integer")
    self.storage = storage
    self.offset = int(offset)
    self.size = _ints(size, "size")
    self.stride = _ints(stride, "stride")
    self.dtype = dtype  # element type of an untyped (byte) storage; None for typed storages
    # Refused here, before any storage is materialised, against the size the pickle declares
    # (torch_tensors checks again against the bytes actually read).
    reason = check_view(self.declared_numel(), self.offset, self.size, self.stride)
    if reason:
      raise _Corrupt(f"{reason} of storage {storage.key!r} (corrupt file)")

  def declared_numel(self) -> int:
    """Elements of the tensor's dtype the storage declares."""
    if self.dtype is None:
      return self.storage.numel
    return self.storage.numel // self.dtype.itemsize


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


class _RestrictedUnpickler(pickle._Unpickler):  # pure Python: see the module's docstring
  """An Unpickler that resolves only allow-listed globals and storage persistent ids."""

  dispatch = dict(pickle._Unpickler.dispatch)

  def __init__(self, file: BinaryIO, *, path: str, storages: dict[str, _Storage],
               load_record=None, allow_script_objects: bool = False):
    super().__init__(file)
    self._path = path
    self._storages = storages
    self._load_record = load_record
    self._allow_script = allow_script_objects
    self._script_classes: dict[str, type] = {}

  def _load_mark(self) -> None:
    if len(self.metastack) >= MAX_DEPTH:
      raise _Corrupt(f"the pickle nests more than {MAX_DEPTH} levels deep")
    pickle._Unpickler.load_mark(self)

  def _load_build(self) -> None:
    # BUILD sets attributes: torch uses it on OrderedDicts (their _metadata) and TorchScript
    # objects (old files also BUILD dicts with an empty state: a no-op). On a tensor or
    # storage record it would bypass their checks.
    inst, state = self.stack[-2], self.stack[-1]
    if state and not isinstance(inst, (collections.OrderedDict, ScriptObject)):
      raise UnsafeCheckpointError(
          f"{self._path}: refusing to load: the pickle sets the state of a "
          f"{type(inst).__name__}, which checkpoints never do")
    pickle._Unpickler.load_build(self)

  def _refuse_buffer(self) -> None:
    # Protocol-5 buffers: BYTEARRAY8 zero-fills its declared length before reading it.
    raise _Corrupt("the pickle uses protocol-5 buffers, which checkpoints never do")

  dispatch[pickle.MARK[0]] = _load_mark
  dispatch[pickle.BUILD[0]] = _load_build
  for _op in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
    dispatch[_op[0]] = _refuse_buffer
  del _op

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
        return self._script_class(f"{module}.{name}", name)
    raise UnsafeCheckpointError(
        f"{self._path}: refusing to load: the pickle asks for '{module}.{name}', which is not a "
        "tensor or a plain container. Only weights are read from checkpoints; a file that needs "
        "other objects may run arbitrary code and is not loaded.")

  def _script_class(self, qualname: str, name: str) -> type:
    # One class per name, and a bounded number of names: each class costs a kilobyte.
    if qualname not in self._script_classes:
      if len(self._script_classes) >= MAX_SCRIPT_CLASSES:
        raise _Corrupt(f"the archive names more than {MAX_SCRIPT_CLASSES} TorchScript classes")
      self._script_classes[qualname] = type(
          name, (ScriptObject,), {"__new__": lambda cls, *a: _new_script(cls, qualname)})
    return self._script_classes[qualname]

  def persistent_load(self, pid: Any) -> Any:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise UnsafeCheckpointError(f"{self._path}: unknown persistent id {_short.repr(pid)}")
    storage_type, key, numel = pid[1], pid[2], pid[4]   # pid[3]: the device, unused
    if not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(
          f"{self._path}: storage of unknown type {_short.repr(storage_type)}")
    if not isinstance(key, (str, int)) or not isinstance(numel, int) or not (
        0 <= numel <= MAX_DIM):
      raise _Corrupt(f"bad storage record {_short.repr(pid)}")
    key = str(key)
    dtype = storage_type.dtype
    if key not in self._storages:
      storage = _Storage(key, dtype, int(numel))  # UntypedStorage: numel counts bytes
      if self._load_record is not None:
        storage.data = self._load_record(key, dtype, storage.numel)
      self._storages[key] = storage
    storage = self._storages[key]
    view_meta = pid[5] if len(pid) > 5 else None
    if view_meta is not None:  # legacy views into a larger storage: (view_key, offset, size)
      if not (isinstance(view_meta, tuple) and len(view_meta) == 3
              and all(isinstance(v, int) for v in view_meta[1:])):
        raise _Corrupt(f"bad storage view {_short.repr(view_meta)}")
      _, offset, size = view_meta
      if offset < 0 or size < 0 or offset + size > storage.numel:
        raise _Corrupt(f"storage view [{offset}:{offset + size}] runs past storage {key!r} of "
                       f"{storage.numel} elements")
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


def _unpickle(data: BinaryIO, **kwargs) -> Any:
  path = kwargs["path"]
  try:
    return _RestrictedUnpickler(data, **kwargs).load()
  except _UnsupportedDtype as e:
    raise CheckpointError(
        f"{path}: unsupported tensor dtype torch.{e.dtype_name} (no numpy equivalent to read "
        "it into); convert the checkpoint to a float dtype first") from None
  except CheckpointError as e:
    if str(e).startswith(path):
      raise
    # Raised where the file's name was not at hand (rebuild functions, _Corrupt): add it.
    cls = UnsafeCheckpointError if isinstance(e, UnsafeCheckpointError) else CheckpointError
    raise cls(f"{path}: {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    # Whatever a hostile byte stream makes the opcodes raise (EOFError, KeyError of a missing
    # memo entry, OverflowError, RecursionError, MemoryError ...) means one thing: the file
    # is not a checkpoint we can read. The type stays in the message for a bug report.
    raise CheckpointError(
        f"{path}: cannot read the checkpoint's pickle ({type(e).__name__}: "
        f"{_short.repr(str(e))[1:-1]}); the file is truncated or corrupt") from None
