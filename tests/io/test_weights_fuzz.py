"""Fuzzing the weight readers: valid small files with bytes flipped, inserted, deleted or cut
must read as arrays or be refused with one UserError line naming the file; no other exception,
and no large allocation (the process's peak memory may grow by less than 100 MB overall)."""

from __future__ import annotations

import io
import os
import resource
import tempfile
import zipfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from adjax.errors import UserError  # noqa: E402
from adjax.io import pth_writer  # noqa: E402
from adjax.io import safetensors  # noqa: E402
from adjax.io import weights  # noqa: E402

_TREE = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
         "b": {"c": np.arange(3, dtype=np.int64), "d": np.float16(1.5)}}


def _npz_bytes() -> bytes:
  out = io.BytesIO()
  np.savez(out, a=_TREE["a"], c=_TREE["b"]["c"])
  return out.getvalue()


def _safetensors_bytes() -> bytes:
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "w.safetensors")
    safetensors.save_safetensors(path, {"a": _TREE["a"], "c": _TREE["b"]["c"]},
                                 {"backbone": "tiny-vit", "step": "3"})
    with open(path, "rb") as f:
      return f.read()


def _torch_bytes(zip_format: bool) -> bytes | None:
  try:
    import torch
  except ImportError:
    return None
  base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  out = io.BytesIO()
  torch.save({"w": base, "view": base[1:, 2:], "t": base.t(), "n": 3},
             out, _use_new_zipfile_serialization=zip_format)
  return out.getvalue()


# name -> (file extension, valid bytes). data.pkl is also fuzzed on its own, re-zipped with a
# fresh CRC: a flipped byte inside the zip would mostly be caught by the CRC check.
_SEEDS = {
    "pth_writer": (".pth", pth_writer.pth_bytes(_TREE)),
    "safetensors": (".safetensors", _safetensors_bytes()),
    "npz": (".npz", _npz_bytes()),
    "torch_zip": (".pth", _torch_bytes(True)),
    "torch_legacy": (".pth", _torch_bytes(False)),
}
_SEEDS = {k: v for k, v in _SEEDS.items() if v[1] is not None}


def _data_pkl_pth(mutated_pickle: bytes) -> bytes:
  """The pth_writer file with its data.pkl replaced."""
  src = zipfile.ZipFile(io.BytesIO(_SEEDS["pth_writer"][1]))
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w") as zf:
    for name in src.namelist():
      zf.writestr(name, mutated_pickle if name.endswith("data.pkl") else src.read(name))
  return out.getvalue()


_PICKLE = zipfile.ZipFile(io.BytesIO(_SEEDS["pth_writer"][1])).read("archive/data.pkl")

_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.sampled_from([0, 0x7F, 0x80, 0xFF])),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=9)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 16)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20)),
)


def _mutate(data: bytes, ops) -> bytes:
  buf = bytearray(data)
  for op in ops:
    if not buf:
      break
    at = op[1] % len(buf)
    if op[0] == "flip":
      buf[at] ^= op[2]
    elif op[0] == "set":
      buf[at] = op[2]
    elif op[0] == "insert":
      buf[at:at] = op[2]
    elif op[0] == "delete":
      del buf[at:at + op[2]]
    else:
      del buf[at:]
  return bytes(buf)


def _check(folder: str, ext: str, data: bytes) -> None:
  path = os.path.join(folder, "fuzz" + ext)
  with open(path, "wb") as f:
    f.write(data)
  try:
    flat = weights.read_state_dict(path)
  except UserError as err:
    message = str(err)
    assert "\n" not in message and path in message, message
    return
  assert flat and all(isinstance(v, np.ndarray) for v in flat.values())


_FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None)


@pytest.mark.parametrize("seed", sorted(_SEEDS))
def test_mutated_files_are_read_or_refused_in_one_line(tmp_path, seed):
  ext, valid = _SEEDS[seed]
  _check(str(tmp_path), ext, valid)  # the seed itself reads

  @_FUZZ
  @given(st.lists(_op, min_size=1, max_size=4))
  def fuzz(ops):
    _check(str(tmp_path), ext, _mutate(valid, ops))

  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  fuzz()
  grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
  assert grown_kb < 100 * 1024, grown_kb


def test_mutated_pickles_are_read_or_refused_in_one_line(tmp_path):
  @_FUZZ
  @given(st.lists(_op, min_size=1, max_size=4))
  def fuzz(ops):
    _check(str(tmp_path), ".pth", _data_pkl_pth(_mutate(_PICKLE, ops)))

  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  fuzz()
  grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
  assert grown_kb < 100 * 1024, grown_kb
