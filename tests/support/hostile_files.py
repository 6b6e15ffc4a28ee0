"""Small hostile weight files for tests/io/test_hostile_weights.py: each is a few bytes to a few
kilobytes that, read naively, would allocate gigabytes, recurse past Python's limit or traceback.
Built by hand (pickle opcodes, zip records) with adjax's own .pth writer, without torch."""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile

import numpy as np

from adjax.io import pth_writer

_LEGACY_HEADER = b"".join(pickle.dumps(x, protocol=2) for x in (
    0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}))


class _View:
  """Pickles as a tensor rebuild with any offset, size and stride over a storage."""

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride))

  def __reduce__(self):
    return (pth_writer._REBUILD_TENSOR_V2, (*self.args, False, collections.OrderedDict()))


class _Pickler(pth_writer._TorchPickler):
  """adjax's checkpoint pickler, with the storage's declared element count overridable."""

  dispatch = dict(pth_writer._TorchPickler.dispatch)
  numel: int | None = None

  def persistent_id(self, obj):
    pid = super().persistent_id(obj)
    if pid is not None and self.numel is not None:
      pid = pid[:4] + (self.numel,)
    return pid


def storage(values=(1.0,)) -> pth_writer._Storage:
  return pth_writer._Storage("0", np.asarray(values, np.float32))


def pickled(tree, numel: int | None = None) -> bytes:
  buffer = io.BytesIO()
  pickler = _Pickler(buffer, protocol=2)
  pickler.numel = numel
  pickler.dump(tree)
  return buffer.getvalue()


def zip_pth(data_pkl: bytes, records: dict[str, bytes] | None = None,
            compress: bool = False) -> bytes:
  out = io.BytesIO()
  method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
  with zipfile.ZipFile(out, "w", method) as zf:
    zf.writestr("archive/data.pkl", data_pkl)
    for key, raw in (records or {}).items():
      zf.writestr(f"archive/data/{key}", raw)
  return out.getvalue()


def view_pth(size, stride, offset: int = 0, values=(1.0,)) -> bytes:
  """A zip .pth whose one tensor is the given view of a storage holding `values`."""
  s = storage(values)
  return zip_pth(pickled({"w": _View(s, offset, size, stride)}), {"0": s.array.tobytes()})


def zip_bomb_pth(nbytes: int = 64 << 20) -> bytes:
  """A storage of `nbytes` zero bytes deflated to about nbytes / 1000."""
  s = pth_writer._Storage("0", np.zeros(nbytes // 4, np.float32))
  tree = {"w": _View(s, 0, (nbytes // 4,), (1,))}
  return zip_pth(pickled(tree), {"0": bytes(nbytes)}, compress=True)


def lying_record_pth() -> bytes:
  """The pickle declares 4 bytes; the zip record declares (and inflates to) 64 MiB."""
  s = storage()
  return zip_pth(pickled({"w": _View(s, 0, (1,), (1,))}), {"0": bytes(64 << 20)},
                 compress=True)


def legacy_pth(count: int, tail: bytes = b"\0" * 4) -> bytes:
  """A legacy .pth whose one storage's on-disk element count is `count`."""
  s = storage()
  return (_LEGACY_HEADER + pickled({"w": _View(s, 0, (1,), (1,))}) + pickle.dumps(["0"], 2)
          + struct.pack("<q", count) + tail)


def deep_list_pickle(depth: int) -> bytes:
  """[[[...]]] `depth` deep, built without MARK: EMPTY_LIST * depth then APPEND * (depth-1)."""
  return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def deep_mark_pickle(depth: int) -> bytes:
  """(((( ... `depth` MARKs deep, each closed into a tuple."""
  return b"\x80\x02" + b"(" * depth + b"t" * depth + b"."


def shared_dag_pickle(levels: int) -> bytes:
  """l_{i+1} = [l_i, l_i]: 2**levels paths through `levels` lists (a billion laughs)."""
  out = b"\x80\x02]q\x00"  # l0 = [] memoised at 0
  for i in range(levels):
    out += b"(h" + bytes([i]) + b"h" + bytes([i]) + b"lq" + bytes([i + 1])
  return out + b"."


HUGE_MEMO_PUT = b"\x80\x02]r\xff\xff\xff\x7f."          # LONG_BINPUT 2**31 - 1
HUGE_BYTEARRAY = b"\x80\x05\x96" + struct.pack("<Q", 1 << 34) + b"."  # BYTEARRAY8 16 GiB
HUGE_BINBYTES = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"."   # BINBYTES8 1 TiB


def safetensors_bytes(header, data: bytes = b"") -> bytes:
  blob = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(blob)) + blob + data
