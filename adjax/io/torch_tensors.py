"""Tensor records of a checkpoint (adjax.io.torch_unpickler) turned into numpy arrays, within
bounds: a view must lie inside the bytes its storage read from the file, and all the arrays
together may take only a few times those bytes.

Why a budget and not only the view check: a stride-0 view of one float (shape 20000x20000,
strides 0) lies inside its storage yet materialises as 1.6 GB, and a pickle may reference one
tensor record a million times. Real checkpoints hold each storage's bytes about once (views
such as a transposed copy or qkv slices add a little), so the arrays may take
``BUDGET_RATIO`` times the storage bytes plus ``BUDGET_SLACK`` (small expanded buffers).
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from adjax.io.torch_unpickler import (MAX_DEPTH, CheckpointError, ScriptObject, _Storage,
                                      _TensorRef, check_view)

BUDGET_RATIO = 4
BUDGET_SLACK = 32 << 20


class _Budget:
  """Bytes the arrays of one file may still take."""

  def __init__(self, path: str, storage_bytes: int):
    self.path = path
    self.total = BUDGET_RATIO * storage_bytes + BUDGET_SLACK
    self.left = self.total

  def take(self, nbytes: int, ref: _TensorRef) -> None:
    if nbytes > self.left:
      raise CheckpointError(
          f"{self.path}: tensor of shape {ref.size} (strides {ref.stride}) in storage "
          f"{ref.storage.key!r} would take {nbytes} bytes, past the {self.total} bytes this "
          "file's storages can account for (a view repeated beyond its data; hostile or corrupt)")
    self.left -= nbytes


def _array(ref: _TensorRef, path: str, budget: _Budget) -> np.ndarray:
  data = ref.storage.data
  if not isinstance(data, np.ndarray):
    raise CheckpointError(f"{path}: storage {ref.storage.key!r} was never read (corrupt file)")
  if ref.dtype is not None and ref.dtype != data.dtype:
    # Offsets and strides count elements of the tensor's dtype, so view the bytes as it.
    if data.dtype != np.uint8:
      raise CheckpointError(
          f"{path}: a {ref.dtype.name} tensor points into storage {ref.storage.key!r} of "
          f"{data.dtype.name} elements (corrupt file)")
    if data.nbytes % ref.dtype.itemsize:
      raise CheckpointError(
          f"{path}: storage {ref.storage.key!r} of {data.nbytes} bytes does not hold whole "
          f"{ref.dtype.name} elements (corrupt file)")
    data = data.view(ref.dtype)
    if ref.storage.big_endian and ref.dtype.itemsize > 1:
      data = data.byteswap()
  # Checked again against what was read: the declared size may differ from the record's.
  reason = check_view(data.size, ref.offset, ref.size, ref.stride)
  if reason:
    raise CheckpointError(f"{path}: {reason} of storage {ref.storage.key!r} (corrupt file)")
  budget.take(int(np.prod(ref.size, dtype=object)) * data.itemsize, ref)
  if 0 in ref.size:
    return np.zeros(ref.size, data.dtype)
  # as_strided goes through __array_interface__, which cannot describe some ml_dtypes types
  # (float8): stride over their bytes as same-width unsigned ints, then view them back.
  raw = data if data.dtype.isbuiltin == 1 else data.view(f"u{data.itemsize}")
  view = np.lib.stride_tricks.as_strided(
      raw[ref.offset:], shape=ref.size,
      strides=tuple(st * data.itemsize for st in ref.stride), writeable=False)
  return np.array(view).view(data.dtype)  # own the memory, contiguous


def storage_bytes(storages: dict[str, _Storage]) -> int:
  """Bytes read from the file for these storages (legacy views share their parent's)."""
  return sum(s.data.nbytes for s in storages.values()
             if isinstance(s.data, np.ndarray) and getattr(s, "parent", None) is None)


def materialise(obj: Any, path: str, storage_bytes: int) -> Any:
  """Replaces every tensor record by its numpy array, through containers.

  Args:
    obj: what the restricted unpickler returned.
    path: the file, for messages.
    storage_bytes: bytes its storages read from the file (`storage_bytes`): the arrays may
      take a few times that (see the module's docstring).

  Returns:
    The same tree with numpy arrays. A record or container met twice is converted once and
    shared, so a pickle that references one list from many places stays linear in size.

  Raises:
    CheckpointError: a view outside its storage, past the budget, or nesting past MAX_DEPTH.
  """
  budget = _Budget(path, storage_bytes)
  done: dict[int, tuple[Any, Any]] = {}  # id -> (node, its conversion); node kept alive

  def walk(node: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
      raise CheckpointError(f"{path}: the checkpoint nests more than {MAX_DEPTH} levels deep "
                            "(hostile or corrupt)")
    if not isinstance(node, (_TensorRef, dict, list, tuple, ScriptObject)):
      return node
    if id(node) in done:
      return done[id(node)][1]
    if isinstance(node, _TensorRef):
      out = _array(node, path, budget)
    elif isinstance(node, collections.OrderedDict):
      out = collections.OrderedDict((k, walk(v, depth + 1)) for k, v in node.items())
    elif isinstance(node, dict):
      out = {k: walk(v, depth + 1) for k, v in node.items()}
    elif isinstance(node, list):
      out = [walk(v, depth + 1) for v in node]
    elif isinstance(node, tuple):
      out = tuple(walk(v, depth + 1) for v in node)
    else:
      node.state = {k: walk(v, depth + 1) for k, v in node.state.items()}
      out = node
    done[id(node)] = (node, out)
    return out

  try:
    return walk(obj, 0)
  except RecursionError:  # a caller already deep in its stack; the depth cap is the real bound
    raise CheckpointError(f"{path}: the checkpoint nests too deep to read") from None
