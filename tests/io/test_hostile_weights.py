"""Hostile weight files are refused with one line naming the file, within bounded memory.

Each case is a tiny file that, read naively, would allocate gigabytes (stride-0 views, zip
bombs, legacy counts of 2**62, a pickle memo index of 2**31), recurse past Python's limit
(pickles and JSON headers nested 100,000 deep) or traceback on a wrong type (metadata).
"""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest

import hostile_files as hf
from adjax.cli import main
from adjax.errors import UserError
from adjax.io import safetensors as st
from adjax.io import weights

MEMORY_BOUND = 100 << 20


def _refused(path: str, match: str, read=weights.read_weights_file) -> str:
  """Reads `path`, asserting one UserError line naming it, and at most MEMORY_BOUND traced."""
  tracemalloc.start()
  try:
    with pytest.raises(UserError) as err:
      read(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  message = str(err.value)
  assert "\n" not in message and path in message, message
  assert peak < MEMORY_BOUND, (peak, message)
  assert match in message, message
  return message


def _write(tmp_path, name: str, data: bytes) -> str:
  path = str(tmp_path / name)
  with open(path, "wb") as f:
    f.write(data)
  return path


@pytest.mark.parametrize("size,stride,offset,match", [
    ((20000, 20000), (0, 0), 0, "would take"),             # stride 0: 1.6 GB from 4 bytes
    ((10**7, 10**7), (0, 0), 0, "would take"),
    ((20000, 20000), (20000, 1), 0, "reads element"),      # past the storage
    ((2,), (1,), 5, "reads element"),                      # offset past the storage
    ((2,), (-1,), 1, "negative"),
    ((-2,), (1,), 0, "negative"),
    ((2, 2), (1,), 0, "sizes but"),
    ((2 ** 70,), (0,), 0, "implausibly large"),
])
def test_views_must_fit_their_storage_and_the_file(tmp_path, size, stride, offset, match):
  path = _write(tmp_path, "view.pth", hf.view_pth(size, stride, offset))
  assert os.path.getsize(path) < 2000
  _refused(path, match)


def test_a_small_expanded_view_is_still_read(tmp_path):
  # torch.ones(1).expand(1000) saves a stride-0 view: small ones stay readable.
  path = _write(tmp_path, "expand.pth", hf.view_pth((1000,), (0,), values=(2.0,)))
  got = weights.read_weights_file(path)[0]["w"]
  np.testing.assert_array_equal(got, np.full(1000, 2.0, np.float32))


def test_zip_records_that_inflate_past_their_size_are_refused(tmp_path):
  bomb = hf.zip_bomb_pth()
  assert len(bomb) < (1 << 20)
  _refused(_write(tmp_path, "bomb.pth", bomb), "refusing a hostile")
  _refused(_write(tmp_path, "lying.pth", hf.lying_record_pth()), "refusing a hostile")


@pytest.mark.parametrize("count", [1 << 40, 1 << 62, -1, 2])
def test_legacy_storage_counts_must_fit_in_the_file(tmp_path, count):
  _refused(_write(tmp_path, "legacy.pth", hf.legacy_pth(count)), "bytes left")


def test_legacy_with_a_right_count_is_read(tmp_path):
  path = _write(tmp_path, "legacy.pth", hf.legacy_pth(1, np.float32(3).tobytes()))
  assert weights.read_weights_file(path)[0]["w"].tolist() == [3.0]


@pytest.mark.parametrize("pkl,match", [
    (hf.deep_list_pickle(100_000), "nests"),
    (hf.deep_mark_pickle(100_000), "nests"),
    (hf.HUGE_MEMO_PUT, "no tensors"),        # fine to read, just nothing in it
    (hf.HUGE_BYTEARRAY, "protocol-5"),
    (hf.HUGE_BINBYTES, "truncated or corrupt"),
])
def test_hostile_pickles_stay_small_and_shallow(tmp_path, pkl, match):
  legacy = hf._LEGACY_HEADER + pkl + hf.pickle.dumps([], 2)  # then an empty storage list
  for name, data in (("zip.pth", hf.zip_pth(pkl)), ("legacy.pth", legacy)):
    _refused(_write(tmp_path, name, data), match, read=weights.read_state_dict)


def test_a_pickle_sharing_one_list_everywhere_is_linear(tmp_path):
  path = _write(tmp_path, "dag.pth", hf.zip_pth(hf.shared_dag_pickle(60)))
  weights.read_weights_file(path)  # 2**60 paths, 61 lists: the tree is converted once each
  with pytest.raises(UserError, match="entries"):
    weights.read_state_dict(path)


@pytest.mark.parametrize("data,match", [
    (hf.safetensors_bytes(b"[" * 200_000), "nests too deep"),
    (hf.struct.pack("<Q", 1000) + b"{}", "exceeds the file"),
    (b"\x00\x00\x00\x00\x00\x00\x00\x10{}", "exceeds the file"),
    (hf.safetensors_bytes({"__metadata__": ["a", "b"]}), "not an object"),
    (hf.safetensors_bytes({"__metadata__": {"k": {"nested": "x"}}}), "key 'k'"),
    (hf.safetensors_bytes({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}},
                          b"\0" * 8), "bad header entry"),
    (hf.safetensors_bytes({"w": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}},
                          b"\0" * 8), "bad header entry"),
    # int64 product 2**62 * 4 wraps to 0, which would match an empty byte range.
    (hf.safetensors_bytes({"w": {"dtype": "U8", "shape": [2**62, 4],
                                 "data_offsets": [0, 0]}}), "spans"),
])
def test_hostile_safetensors_headers(tmp_path, data, match):
  _refused(_write(tmp_path, "w.safetensors", data), match)


def test_npz_members_are_checked_before_numpy_allocates(tmp_path):
  import zipfile
  path = str(tmp_path / "w.npz")
  np.savez(path, a=np.zeros(4, np.float32))
  with zipfile.ZipFile(path) as zf:
    member = zf.read("a.npy")
  header = member.replace(b"(4,)", b"(4000000000,)").replace(b"    \n", b"\n", 1)
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("a.npy", header)
  _refused(path, "declares an array")
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("a.npy", member[:128] + bytes(64 << 20))
  _refused(path, "zip bomb")


def _export_file(tmp_path, **metadata) -> str:
  """A projector .safetensors as `adjax export` writes it, with `metadata` changed."""
  torch = pytest.importorskip("torch")
  from torch_reference import Projector
  torch.manual_seed(0)
  state = {k: v.numpy() for k, v in Projector((64,) * 4, heads=4, num_ref=16).state_dict().items()}
  base = {"format": "adjax-projector", "backbone": "tiny-vit", "which": "angle",
          "num_heads": "4", "step": "7", "metrics": "{}"}
  path = str(tmp_path / "proj.safetensors")
  st.save_safetensors(path, state, {**base, **metadata})
  return path


@pytest.mark.parametrize("key,value", [
    ("num_heads", "1e999"), ("num_heads", "0"), ("num_heads", "true"), ("num_heads", "[[["),
    ("image_size", "{}"), ("image_size", "224.5"), ("taps", '"3,6"'), ("taps", "[-1]"),
    ("step", "x"), ("step", "-3"), ("metrics", "[1]"), ("metrics", "[" * 5000 + "]" * 5000),
])
def test_import_checks_metadata_before_writing_anything(tmp_path, capsys, key, value):
  path = _export_file(tmp_path, **{key: value})
  run = str(tmp_path / "run")
  assert main(["import", path, "--out", run]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and path in err and repr(key) in err, err
  assert not os.path.exists(run)


def test_import_of_good_metadata_still_works(tmp_path, capsys):
  path = _export_file(tmp_path, image_size="224", taps="null")
  run = str(tmp_path / "run")
  assert main(["import", path, "--out", run]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["step"] == 7 and summary["kinds"] == ["angle"]


def test_a_tensor_of_the_wrong_rank_for_its_transform_is_named(tmp_path):
  from adjax.io import mapping
  template = {"conv": {"kernel": np.zeros((3, 3, 2, 4), np.float32)}}
  state = {"conv.weight": np.zeros((4, 2), np.float32)}  # a conv kernel needs 4 dims
  rules = [mapping.Rule("conv/kernel", "conv.weight", mapping.conv2d)]
  with pytest.raises(UserError, match=r"w\.pth into m: conv\.weight -> conv/kernel") as err:
    mapping.apply_rules(state, rules, template, source="w.pth", model="m")
  assert "\n" not in str(err.value)
