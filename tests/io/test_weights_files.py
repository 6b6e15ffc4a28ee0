"""Weights files as users have them: wrapped, mislabelled, replaced, quantised, or not weights.

Each test builds its files with torch / transformers (tiny random models) and goes through the
real reading path (``read_state_dict`` / ``Backbone.load`` / ``load_torch_file`` /
``projector_from_torch``).
"""
from __future__ import annotations

import logging
import os
import time
import warnings

import jax
import numpy as np
import pytest
import torch

from adjax.io import mapping
from adjax.io import safetensors as safetensors_io
from adjax.io import torch_pickle
from adjax.models.projector_torch import projector_from_torch
from adjax.models.projector_torch import projector_to_torch
from adjax.models.backbones import get_backbone
from adjax.models.backbones.base import read_state_dict

torch.set_num_threads(1)


def _tiny_vit():
  return get_backbone("tiny-vit", width=32, depth=1, heads=2, taps=(1,))


def _official_dinov2_state(params) -> dict[str, torch.Tensor]:
  """Official facebookresearch DINOv2 keys (blocks.0.attn.qkv ...) holding ``params``."""
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  sd = {"cls_token": t(params["cls_token"])[None, None], "pos_embed": t(params["pos_embed"])[None],
        "mask_token": torch.zeros(1, params["cls_token"].shape[0]),
        "patch_embed.proj.weight": t(params["patch_embed"]["kernel"]).permute(3, 2, 0, 1),
        "patch_embed.proj.bias": t(params["patch_embed"]["bias"]),
        "norm.weight": torch.ones(params["cls_token"].shape[0]),
        "norm.bias": torch.zeros(params["cls_token"].shape[0])}
  block = params["blocks_0"]
  for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
    sd[f"blocks.0.{theirs}.weight"] = t(block[ours]["scale"])
    sd[f"blocks.0.{theirs}.bias"] = t(block[ours]["bias"])
  for ours, theirs in (("qkv", "attn.qkv"), ("proj", "attn.proj"), ("fc1", "mlp.fc1"),
                       ("fc2", "mlp.fc2")):
    sd[f"blocks.0.{theirs}.weight"] = t(block[ours]["kernel"]).T.contiguous()
    sd[f"blocks.0.{theirs}.bias"] = t(block[ours]["bias"])
  sd["blocks.0.ls1.gamma"] = t(block["ls1"])
  sd["blocks.0.ls2.gamma"] = t(block["ls2"])
  return sd


def _assert_same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------- 1. partial prefixes
def test_dinov2_classifier_and_teacher_files_load_their_backbone(tmp_path):
  transformers = pytest.importorskip("transformers")  # imported here: it takes seconds
  cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=14, num_labels=3)
  model = transformers.Dinov2ForImageClassification(cfg)
  sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  assert {k for k in sd if not k.startswith("dinov2.")} == {"classifier.weight",
                                                           "classifier.bias"}
  bb = get_backbone("dinov2-base", width=32, depth=2, heads=2, taps=(1, 2), pos_grid=4,
                    input_size=56)
  safetensors_io.save_safetensors(tmp_path / "cls.safetensors", sd)
  safetensors_io.save_safetensors(tmp_path / "plain.safetensors", {
      k[len("dinov2."):]: v for k, v in sd.items() if k.startswith("dinov2.")})
  _assert_same_params(bb.load(tmp_path / "cls.safetensors", cache=False),
                      bb.load(tmp_path / "plain.safetensors", cache=False))

  # A DINOv2 teacher checkpoint: {"teacher": {backbone.*, dino_head.*, ibot_head.*}}.
  tiny = _tiny_vit()
  params = tiny.init(jax.random.key(0))
  teacher = {"backbone." + k: v for k, v in _official_dinov2_state(params).items()}
  teacher["dino_head.mlp.0.weight"] = torch.zeros(4, 32)
  teacher["ibot_head.last_layer.weight_g"] = torch.zeros(4, 1)
  torch.save({"teacher": teacher}, tmp_path / "teacher.pth")
  _assert_same_params(tiny.load(tmp_path / "teacher.pth", cache=False), params)

  # Keys beside the backbone that no rule ignores are still reported, by name.
  teacher["student_extra.weight"] = torch.zeros(2)
  torch.save({"teacher": teacher}, tmp_path / "teacher_extra.pth")
  with pytest.raises(mapping.ConversionError, match=r"not used.*student_extra\.weight"):
    tiny.load(tmp_path / "teacher_extra.pth", cache=False)


# ----------------------------------------------------------------------- 2. not weights at all
def test_lfs_pointers_and_html_pages_are_named_not_misread(tmp_path):
  lfs = "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
  html = "<!DOCTYPE html><html><body>Not found</body></html>"
  for name, text, hint in (("lfs.pth", lfs, "git lfs pull"), ("page.pth", html, "download"),
                           ("lfs.safetensors", lfs, "git lfs pull"),
                           ("page.safetensors", "\n" + html, "download")):
    (tmp_path / name).write_text(text)
    with pytest.raises(torch_pickle.CheckpointError) as err:
      read_state_dict(tmp_path / name)
    message = str(err.value)
    assert "not a weights file" in message and hint in message and name in message, message
    assert "header" not in message and "\n" not in message, message
  # A real checkpoint is read by its extension's reader, whatever its size.
  torch.save({"w": torch.ones(3)}, tmp_path / "real.pth")
  np.testing.assert_array_equal(read_state_dict(tmp_path / "real.pth")["w"], np.ones(3))


# ----------------------------------------------------------------------- 3. unwritable cache
def test_unwritable_cache_folder_still_returns_the_converted_params(tmp_path, caplog):
  bb = _tiny_vit()
  params = bb.init(jax.random.key(1))
  torch.save(_official_dinov2_state(params), tmp_path / "w.pth")
  (tmp_path / "a_file").write_text("")
  cache_dir = tmp_path / "a_file" / "cache"  # cannot be created, even by root
  with caplog.at_level(logging.WARNING):
    loaded = bb.load(tmp_path / "w.pth", cache_dir=cache_dir)
  _assert_same_params(loaded, params)
  assert any(str(cache_dir) in r.getMessage() for r in caplog.records), caplog.text


# ----------------------------------------------------------------------- 4. cache invalidation
def test_cache_notices_a_same_size_replacement_that_keeps_the_mtime(tmp_path):
  bb = _tiny_vit()
  path, cache = tmp_path / "w.pth", tmp_path / "cache"
  params_a, params_b = bb.init(jax.random.key(1)), bb.init(jax.random.key(2))
  torch.save(_official_dinov2_state(params_a), path)
  before = os.stat(path)
  _assert_same_params(bb.load(path, cache_dir=cache), params_a)
  time.sleep(0.05)  # past the kernel's coarse timestamp tick, so the ctime does change
  # What cp -p / rsync -t / tar x do: same size, other bytes, the old mtime put back.
  torch.save(_official_dinov2_state(params_b), path)
  os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
  after = os.stat(path)
  assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
  _assert_same_params(bb.load(path, cache_dir=cache), params_b)


# ----------------------------------------------------------------------- 5. projector import
def _projector_state(dim: int = 32, refs: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
  """One level, one layer, with the shapes of docs/method.md section 3 (S = 8 for 4C = 128)."""
  rng = np.random.default_rng(seed)
  mlp, se = 4 * dim, 8
  shapes = {"x_ref": (1, refs, dim), "ref_proj.project.weight": (dim, dim, 1),
            "ref_proj.project.bias": (dim,),
            "layers.0.cross_attn.in_proj_weight": (3 * dim, dim),
            "layers.0.cross_attn.in_proj_bias": (3 * dim,),
            "layers.0.cross_attn.out_proj.weight": (dim, dim),
            "layers.0.cross_attn.out_proj.bias": (dim,),
            "layers.0.mlp.fc1.weight": (mlp, dim), "layers.0.mlp.fc1.bias": (mlp,),
            "layers.0.mlp.se.fc1.weight": (se, mlp), "layers.0.mlp.se.fc1.bias": (se,),
            "layers.0.mlp.se.fc2.weight": (mlp, se), "layers.0.mlp.se.fc2.bias": (mlp,),
            "layers.0.mlp.fc2.weight": (dim, mlp), "layers.0.mlp.fc2.bias": (dim,)}
  return {"l1_proj." + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_projector_import_checks_every_shape_against_the_channels(tmp_path):
  sd = _projector_state()
  back = projector_to_torch(projector_from_torch(sd))
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  layer = "l1_proj.layers.0.mlp."

  wide_se = dict(sd)  # an SE width that project() cannot run: 16 instead of 8
  wide_se[layer + "se.fc1.weight"] = np.zeros((16, 128), np.float32)
  wide_se[layer + "se.fc1.bias"] = np.zeros(16, np.float32)
  wide_se[layer + "se.fc2.weight"] = np.zeros((128, 16), np.float32)
  with pytest.raises(ValueError, match=r"se\.fc1\.weight.*\(16, 128\).*\(8, 128\)"):
    projector_from_torch(wide_se)

  wide_mlp = dict(sd)  # a self-consistent MLP of the wrong width is blamed on fc1
  for key, shape in (("fc1.weight", (100, 32)), ("fc1.bias", (100,)),
                     ("se.fc1.weight", (8, 100)), ("se.fc2.weight", (100, 8)),
                     ("se.fc2.bias", (100,)), ("fc2.weight", (32, 100))):
    wide_mlp[layer + key] = np.zeros(shape, np.float32)
  with pytest.raises(ValueError, match=r"mlp\.fc1\.weight.*\(100, 32\).*\(128, 32\)"):
    projector_from_torch(wide_mlp)

  no_layers = {k: v for k, v in sd.items() if ".layers." not in k}
  with pytest.raises(ValueError, match=r"l1_proj.*at least one"):
    projector_from_torch(no_layers)

  ddp = {"module." + k: torch.from_numpy(v) for k, v in sd.items()}
  _assert_same_params(projector_from_torch(ddp), projector_from_torch(sd))


# ----------------------------------------------------------------------- 6. float8 / uint
def test_float8_and_unsigned_tensors_are_read_and_odd_dtypes_named(tmp_path):
  g = torch.Generator().manual_seed(0)
  base = torch.randn(3, 4, generator=g)
  tensors = {"e4m3": base.to(torch.float8_e4m3fn), "e5m2_t": base.to(torch.float8_e5m2).t(),
             "u16_view": torch.arange(12).to(torch.uint16).reshape(3, 4)[:, 1:],
             "u32": (torch.arange(4) * 70000).to(torch.uint32),
             "u64": torch.arange(3).to(torch.uint64)}
  torch.save(tensors, tmp_path / "q.pth")
  out = torch_pickle.load_torch_file(tmp_path / "q.pth")
  for key, t in tensors.items():
    ref = t.float().numpy() if t.is_floating_point() else t.to(torch.int64).numpy()
    assert out[key].shape == tuple(t.shape), key
    np.testing.assert_array_equal(out[key].astype(np.float64), ref.astype(np.float64),
                                  err_msg=key)
  assert out["e4m3"].dtype.name == "float8_e4m3fn" and out["u32"].dtype == np.uint32

  with warnings.catch_warnings():  # torch: "ComplexHalf support is experimental"
    warnings.simplefilter("ignore", UserWarning)
    torch.save({"c": torch.zeros(2, dtype=torch.complex32)}, tmp_path / "c32.pth")
  with pytest.raises(torch_pickle.CheckpointError,
                     match=r"c32\.pth: unsupported tensor dtype torch\.complex32") as err:
    torch_pickle.load_torch_file(tmp_path / "c32.pth")
  assert not isinstance(err.value, torch_pickle.UnsafeCheckpointError)
