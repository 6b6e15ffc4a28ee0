"""The torch-free checkpoint readers: values equal torch's, unsafe pickles refused, truncation.

Reference values come from torch itself (``torch.save`` / ``torch.load`` /
``torch.jit.save``) and from the ``safetensors`` package.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from adjax.io import safetensors as safetensors_io
from adjax.io import torch_pickle
from adjax.models.backbones.efficientnet import default_weights_path


def _tensors() -> dict:
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=g)
  return {
      "f32": base,
      "f16": base.half(),
      "bf16": base.bfloat16(),
      "i64": torch.arange(7),
      "bool": base > 0,
      "u8": torch.arange(5, dtype=torch.uint8),
      "view": base[1:4, 2:],          # storage offset + strides of a shared storage
      "transposed": base.t(),         # non-contiguous
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 3),
  }


def _as_numpy(t: torch.Tensor) -> np.ndarray:
  if t.dtype == torch.bfloat16:
    return t.float().numpy().astype(ml_dtypes.bfloat16)
  return t.numpy()


@pytest.mark.parametrize("zip_format", [True, False])
def test_reads_tensors_and_containers_like_torch(tmp_path, zip_format):
  tensors = _tensors()
  obj = {"state_dict": tensors, "nested": [tensors["f32"], (1, "x", None)], "epoch": 7,
         "param": torch.nn.Parameter(torch.ones(3))}
  path = tmp_path / "ckpt.pth"
  torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
  got = torch_pickle.load_torch_file(path)
  assert got["epoch"] == 7 and got["nested"][1] == (1, "x", None)
  np.testing.assert_array_equal(got["param"], np.ones(3, np.float32))
  for k, t in tensors.items():
    assert got["state_dict"][k].dtype == _as_numpy(t).dtype, k
    assert got["state_dict"][k].shape == tuple(t.shape), k
    np.testing.assert_array_equal(got["state_dict"][k], _as_numpy(t), err_msg=k)
  flat = torch_pickle.load_torch_state_dict(path)
  assert "state_dict.f32" in flat and "nested.0" in flat and "param" in flat


def test_reads_real_legacy_checkpoint_like_torch():
  path = default_weights_path()
  ours = torch_pickle.load_torch_state_dict(path)
  ref = torch.load(path, map_location="cpu", weights_only=True)
  assert list(ours) == list(ref)
  for k, t in ref.items():
    np.testing.assert_array_equal(ours[k], t.numpy(), err_msg=k)


class _Module(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, 4, 2, bias=False)
    self.class_embedding = torch.nn.Parameter(torch.randn(4))
    self.blocks = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.MultiheadAttention(4, 2))
    self.register_buffer("stats", torch.arange(3.0))

  def forward(self, x):
    return self.conv1(x).mean() + self.class_embedding.sum()


def test_reads_torchscript_archive_as_state_dict(tmp_path):
  module = _Module().half()
  path = tmp_path / "scripted.pt"
  torch.jit.save(torch.jit.trace(module, torch.ones(1, 3, 4, 4, dtype=torch.half)), str(path))
  ref = torch.jit.load(str(path)).state_dict()
  ours = torch_pickle.load_torch_state_dict(path)
  assert sorted(ours) == sorted(ref)
  for k, t in ref.items():
    assert ours[k].dtype == np.float16
    np.testing.assert_array_equal(ours[k], t.numpy(), err_msg=k)


class _Evil:
  """Pickles to a call of os.system: loading it must not run the command."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _legacy_bytes(payload) -> bytes:
  header = b"".join(pickle.dumps(x, protocol=2) for x in (
      0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}))
  return header + pickle.dumps(payload, protocol=2)


@pytest.mark.parametrize("layout", ["zip", "legacy", "nested"])
def test_malicious_pickle_is_refused_without_running(tmp_path, layout):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  if layout == "zip":
    torch.save({"weight": torch.ones(2), "x": _Evil(str(marker))}, path)
  elif layout == "legacy":
    path.write_bytes(_legacy_bytes({"weight": _Evil(str(marker))}))
  else:  # a hand-written zip whose data.pkl hides the call inside plain containers
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("archive/data.pkl", pickle.dumps([1, {"a": _Evil(str(marker))}], protocol=2))
  # test_plain_pickle_of_the_same_payload_would_run_it shows the payload is live.
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match=r"refusing.*(posix|os)\.system"):
    torch_pickle.load_torch_file(path)
  assert not marker.exists()


def test_plain_pickle_of_the_same_payload_would_run_it(tmp_path):
  """Control for the refusal test: the crafted payload is live under plain pickle."""
  marker = tmp_path / "ran"
  pickle.loads(pickle.dumps(_Evil(str(marker))))
  assert marker.exists()


def test_truncated_files_give_clear_errors(tmp_path):
  full = tmp_path / "full.pth"
  torch.save({"w": torch.randn(64, 64), "b": torch.randn(64)}, full)
  data = full.read_bytes()
  cut = tmp_path / "cut.pth"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(torch_pickle.CheckpointError, match="truncated|corrupt"):
    torch_pickle.load_torch_file(cut)
  legacy = default_weights_path()
  with open(legacy, "rb") as f:
    part = f.read(os.path.getsize(legacy) // 3)
  cut.write_bytes(part)
  with pytest.raises(torch_pickle.CheckpointError, match="truncated"):
    torch_pickle.load_torch_file(cut)
  cut.write_bytes(b"hello world, not a checkpoint")
  with pytest.raises(torch_pickle.CheckpointError, match="not a PyTorch checkpoint"):
    torch_pickle.load_torch_file(cut)


def test_safetensors_roundtrip_and_truncation(tmp_path):
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  tensors = {k: _as_numpy(t) for k, t in _tensors().items()
             if k not in ("view", "transposed")}
  path = tmp_path / "t.safetensors"
  safetensors_io.save_safetensors(path, tensors, metadata={"who": "test"})
  ref = load_file(str(path))  # the reference implementation reads our file
  ours = safetensors_io.load_safetensors(path)
  assert list(ours) == list(tensors) and safetensors_io.read_metadata(path) == {"who": "test"}
  for k, v in tensors.items():
    np.testing.assert_array_equal(ours[k], v, err_msg=k)
    np.testing.assert_array_equal(_as_numpy(ref[k]), v, err_msg=k)
  data = path.read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[:-20])
  with pytest.raises(safetensors_io.SafetensorsError, match="truncated"):
    safetensors_io.load_safetensors(tmp_path / "cut.safetensors")
