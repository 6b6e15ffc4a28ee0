"""Backbones: numerical parity with PyTorch on tiny random models, and real EfficientNet weights.

DINOv2 and CLIP are checked against ``transformers`` (``Dinov2Model``, ``CLIPVisionModel``),
ImageBind and Wide-ResNet against small PyTorch definitions written here with the official
module layouts (so their state-dict keys are the official ones). Weights go through the real
loading path: written with ``torch.save`` / ``torch.jit.save`` / safetensors, read back by
``Backbone.load`` (our torch-free reader, the mapping tables, the cache).
"""
from __future__ import annotations

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from adjax.io import mapping
from adjax.io import safetensors as safetensors_io
from adjax.models.backbones import BACKBONES
from adjax.models.backbones import get_backbone
from adjax.models.backbones import vit
from adjax.models.backbones.efficientnet import default_weights_path

torch.set_num_threads(1)
TOL = 1e-4


def _randomise(module: nn.Module, seed: int) -> None:
  """Give every parameter and BN statistic a random value (positive for variances)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in module.state_dict().items():
      if not t.is_floating_point():
        continue
      if name.endswith("running_var"):
        t.copy_(0.5 + torch.rand(t.shape, generator=g))
      elif name.endswith(("weight", "lambda1", "gamma")) and t.ndim == 1:
        t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=g))
      else:
        t.copy_(0.3 * torch.randn(t.shape, generator=g) / max(1, t[0].numel()) ** 0.25)


def _images(b: int, s: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0, 1, (b, s, s, 3)).astype(np.float32)


def _to_torch(images: np.ndarray, mean, std) -> torch.Tensor:
  x = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _tokens_to_grid(h: torch.Tensor, g: int) -> np.ndarray:
  """(B, 1 + g*g, D) hidden state -> (B, g, g, D) patch tokens."""
  h = h[:, 1:].detach().numpy()
  return h.reshape(h.shape[0], g, g, h.shape[-1])


def _assert_levels(ours, ref, tol=TOL):
  assert len(ours) == len(ref)
  for k, (a, b) in enumerate(zip(ours, ref)):
    a = np.asarray(a)
    assert a.shape == b.shape, (k, a.shape, b.shape)
    np.testing.assert_allclose(a, b, atol=tol, rtol=tol, err_msg=f"level {k}")


def _save_safetensors(path, model: nn.Module, prefix: str = "") -> str:
  safetensors_io.save_safetensors(
      path, {prefix + k: v.detach().numpy() for k, v in model.state_dict().items()})
  return str(path)


# --------------------------------------------------------------------------------- registry
def test_registry_lists_names_and_rejects_unknown():
  for name in ("dinov2-base", "dinov2-large", "clip-base", "clip-large", "imagebind",
               "wide-resnet50", "efficientnet-lite0", "tiny-vit"):
    assert name in BACKBONES
  with pytest.raises(ValueError, match="dinov2-base.*efficientnet-lite0"):
    get_backbone("resnet-9000")


def test_paper_configurations_match_spec():
  """Dims, strides, grids and constants of docs/method.md section 1 (shapes only, no weights)."""
  expected = {"dinov2-base": (768, 14, 16, 12), "dinov2-large": (1024, 14, 16, 24),
              "clip-base": (768, 16, 14, 12), "clip-large": (1024, 14, 16, 24),
              "imagebind": (1280, 14, 16, 32)}
  for name, (dim, stride, grid, depth) in expected.items():
    bb = get_backbone(name)
    assert bb.level_dims == (dim,) * 4 and bb.level_strides == (stride,) * 4
    assert bb.input_size // stride == grid
    assert bb.config["taps"] == tuple(depth * k // 4 for k in (1, 2, 3, 4))
    assert bb.config["depth"] == depth
  assert get_backbone("clip-base").mean == (0.48145466, 0.4578275, 0.40821073)
  assert get_backbone("imagebind").std == (0.26862954, 0.26130258, 0.27577711)
  assert get_backbone("dinov2-large").mean == (0.485, 0.456, 0.406)
  # ImageBind-H: MLP 5120, patch embedding without bias, 257-row position table.
  shapes = get_backbone("imagebind").param_shapes()  # traced, not allocated
  assert "blocks_31" in shapes and "blocks_32" not in shapes
  assert shapes["blocks_0"]["fc1"]["kernel"].shape == (1280, 5120)
  assert "bias" not in shapes["patch_embed"] and shapes["pos_embed"].shape == (257, 1280)
  assert get_backbone("dinov2-base").param_shapes()["pos_embed"].shape == (1 + 37 * 37, 768)


# --------------------------------------------------------------------------------- DINOv2
def _hf_dinov2(image_size: int, width: int = 32, depth: int = 3, heads: int = 2, seed: int = 0):
  from transformers import Dinov2Config, Dinov2Model  # pylint: disable=g-import-not-at-top
  cfg = Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                     image_size=image_size, patch_size=14, layerscale_value=1.0)
  model = Dinov2Model(cfg).eval()
  _randomise(model, seed)
  return model


def _official_dinov2_state(model) -> dict[str, torch.Tensor]:
  """Rename a transformers Dinov2Model state dict to the official facebookresearch names."""
  sd = model.state_dict()
  out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
         "mask_token": sd["embeddings.mask_token"],
         "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
  for i in range(model.config.num_hidden_layers):
    s, t = f"encoder.layer.{i}.", f"blocks.{i}."
    for c in ("weight", "bias"):
      out[t + f"attn.qkv.{c}"] = torch.cat(
          [sd[s + f"attention.{n}_proj.{c}"] for n in "qkv"], dim=0)
      out[t + f"attn.proj.{c}"] = sd[s + f"attention.o_proj.{c}"]
      for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
        out[t + f"{n}.{c}"] = sd[s + f"{n}.{c}"]
    out[t + "ls1.gamma"] = sd[s + "layer_scale1.lambda1"]
    out[t + "ls2.gamma"] = sd[s + "layer_scale2.lambda1"]
  return out


def test_dinov2_matches_transformers(tmp_path):
  """Hidden states of the tapped blocks, HF safetensors and official .pth both, plus cache."""
  model = _hf_dinov2(image_size=56)
  images = _images(2, 56)
  bb = get_backbone("dinov2-base", width=32, depth=3, heads=2, taps=(1, 3), pos_grid=4,
                    input_size=56)
  with torch.no_grad():
    hs = model(_to_torch(images, bb.mean, bb.std), output_hidden_states=True).hidden_states
  ref = [_tokens_to_grid(hs[t], 4) for t in (1, 3)]

  path = _save_safetensors(tmp_path / "dinov2.safetensors", model)
  params = bb.load(path, cache_dir=tmp_path / "cache")
  _assert_levels(bb.extract(params, images), ref)
  cached = os.listdir(tmp_path / "cache")
  assert len(cached) == 1 and cached[0].endswith(".safetensors")
  again = bb.load(path, cache_dir=tmp_path / "cache")  # from the cache this time
  jax.tree.map(np.testing.assert_array_equal, again, params)

  # Hub files (written by transformers < 5) name the attention layers differently.
  renames = {"attention.q_proj": "attention.attention.query",
             "attention.k_proj": "attention.attention.key",
             "attention.v_proj": "attention.attention.value",
             "attention.o_proj": "attention.output.dense"}
  hub = {}
  for k, v in model.state_dict().items():
    for a, b in renames.items():
      k = k.replace(a, b)
    hub["dinov2." + k] = v.numpy()
  safetensors_io.save_safetensors(tmp_path / "hub.safetensors", hub)
  _assert_levels(bb.extract(bb.load(tmp_path / "hub.safetensors", cache=False), images), ref)

  official = tmp_path / "dinov2_official.pth"
  torch.save(_official_dinov2_state(model), official)
  params2 = bb.load(official, cache=False)
  _assert_levels(bb.extract(params2, images), ref)


def _official_pos_interpolation(self, embeddings, height, width):
  """facebookresearch/dinov2 ``interpolate_pos_encoding`` (scale_factor with the 0.1 offset)."""
  pos = self.position_embeddings
  n = pos.shape[1] - 1
  m = int(n ** 0.5)
  h0, w0 = height // 14, width // 14
  patch = torch.nn.functional.interpolate(
      pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2),
      scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic", antialias=False)
  assert patch.shape[-2:] == (h0, w0)
  return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)


def test_dinov2_224_from_518_position_table(tmp_path):
  """37 x 37 table at 224 px: the official offset resampling, and HF's plain resize."""
  import types  # pylint: disable=g-import-not-at-top
  model = _hf_dinov2(image_size=518, width=16, depth=1, heads=2, seed=1)
  images = _images(1, 224, seed=1)
  path = _save_safetensors(tmp_path / "dinov2_518.safetensors", model)
  kw = dict(width=16, depth=1, heads=2, taps=(1,))
  official = get_backbone("dinov2-base", **kw)  # interpolate_offset=0.1
  plain = get_backbone("dinov2-base", interpolate_offset=0.0, **kw)
  x = _to_torch(images, official.mean, official.std)
  with torch.no_grad():
    ref_plain = _tokens_to_grid(model(x, output_hidden_states=True).hidden_states[1], 16)
    model.embeddings.interpolate_pos_encoding = types.MethodType(
        _official_pos_interpolation, model.embeddings)
    ref_official = _tokens_to_grid(model(x, output_hidden_states=True).hidden_states[1], 16)
  ours_official = official.extract(official.load(path, cache=False), images)
  ours_plain = plain.extract(plain.load(path, cache=False), images)
  _assert_levels(ours_official, [ref_official])
  _assert_levels(ours_plain, [ref_plain])
  # The two resamplings really differ: a plain resize would fail the official check.
  assert np.abs(ref_official - ref_plain).max() > 100 * TOL


def test_bicubic_matrix_matches_torch_interpolate():
  table = torch.randn(1, 5, 37, 37, generator=torch.Generator().manual_seed(0))
  ref = torch.nn.functional.interpolate(table, scale_factor=16.1 / 37, mode="bicubic")
  got = vit.resize_pos_table(jnp.asarray(table[0].permute(1, 2, 0).reshape(37 * 37, 5).numpy()),
                             37, 16, 0.1)
  np.testing.assert_allclose(np.asarray(got).reshape(16, 16, 5),
                             ref[0].permute(1, 2, 0).numpy(), atol=3e-5)  # f32 rounding


# --------------------------------------------------------------------------------- CLIP
class _OpenAIBlock(nn.Module):
  def __init__(self, d, heads):
    super().__init__()
    self.attn = nn.MultiheadAttention(d, heads)
    self.ln_1 = nn.LayerNorm(d)
    self.mlp = nn.Sequential(collections.OrderedDict(
        c_fc=nn.Linear(d, 4 * d), gelu=nn.GELU(), c_proj=nn.Linear(4 * d, d)))
    self.ln_2 = nn.LayerNorm(d)


class _OpenAIVisual(nn.Module):
  def __init__(self, d, depth, heads, patch, grid):
    super().__init__()
    self.conv1 = nn.Conv2d(3, d, patch, patch, bias=False)
    self.class_embedding = nn.Parameter(torch.zeros(d))
    self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, d))
    self.ln_pre = nn.LayerNorm(d)
    self.transformer = nn.Module()
    self.transformer.resblocks = nn.Sequential(*[_OpenAIBlock(d, heads) for _ in range(depth)])
    self.ln_post = nn.LayerNorm(d)
    self.proj = nn.Parameter(torch.zeros(d, 8))


class _OpenAICLIP(nn.Module):
  """Holds the OpenAI CLIP attribute names (visual tower + a stub of the text side)."""

  def __init__(self, d, depth, heads, patch, grid):
    super().__init__()
    self.visual = _OpenAIVisual(d, depth, heads, patch, grid)
    self.token_embedding = nn.Embedding(10, 8)
    self.logit_scale = nn.Parameter(torch.ones([]))

  def forward(self, x):
    return x * self.logit_scale


def test_clip_matches_transformers_and_reads_torchscript(tmp_path):
  from transformers import CLIPVisionConfig, CLIPVisionModel  # pylint: disable=g-import-not-at-top
  d, depth, heads, patch, size = 32, 3, 2, 16, 64
  cfg = CLIPVisionConfig(hidden_size=d, num_hidden_layers=depth, num_attention_heads=heads,
                         intermediate_size=4 * d, image_size=size, patch_size=patch)
  model = CLIPVisionModel(cfg).eval()
  _randomise(model, 2)
  with torch.no_grad():  # OpenAI archives hold fp16 weights: make them exactly representable
    for p in model.parameters():
      p.copy_(p.half().float())
  images = _images(2, size, seed=2)
  bb = get_backbone("clip-base", width=d, depth=depth, heads=heads, patch=patch,
                    input_size=size, taps=(2, 3))
  with torch.no_grad():
    hs = model(_to_torch(images, bb.mean, bb.std), output_hidden_states=True).hidden_states
  ref = [_tokens_to_grid(hs[t], size // patch) for t in (2, 3)]

  # Hugging Face CLIPModel-style file (vision_model. prefix, text keys present).
  path = tmp_path / "clip.safetensors"
  tensors = {"vision_model." + k: v.numpy() for k, v in model.state_dict().items()}
  tensors["text_model.embeddings.token_embedding.weight"] = np.zeros((10, 8), np.float32)
  safetensors_io.save_safetensors(path, tensors)
  _assert_levels(bb.extract(bb.load(path, cache=False), images), ref)

  # OpenAI TorchScript archive (fp16), written by torch.jit.trace + torch.jit.save.
  sd = model.state_dict()
  oa = _OpenAICLIP(d, depth, heads, patch, size // patch)
  new = {"visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
         "visual.class_embedding": sd["embeddings.class_embedding"],
         "visual.positional_embedding": sd["embeddings.position_embedding.weight"],
         "visual.ln_pre.weight": sd["pre_layrnorm.weight"],
         "visual.ln_pre.bias": sd["pre_layrnorm.bias"]}
  for i in range(depth):
    s, t = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
    new[t + "attn.in_proj_weight"] = torch.cat(
        [sd[s + f"self_attn.{n}_proj.weight"] for n in "qkv"])
    new[t + "attn.in_proj_bias"] = torch.cat([sd[s + f"self_attn.{n}_proj.bias"] for n in "qkv"])
    for c in ("weight", "bias"):
      new[t + f"attn.out_proj.{c}"] = sd[s + f"self_attn.out_proj.{c}"]
      new[t + f"ln_1.{c}"] = sd[s + f"layer_norm1.{c}"]
      new[t + f"ln_2.{c}"] = sd[s + f"layer_norm2.{c}"]
      new[t + f"mlp.c_fc.{c}"] = sd[s + f"mlp.fc1.{c}"]
      new[t + f"mlp.c_proj.{c}"] = sd[s + f"mlp.fc2.{c}"]
  missing, _ = oa.load_state_dict(new, strict=False)
  assert all(not k.startswith("visual.") or "ln_post" in k or k == "visual.proj"
             for k in missing)
  archive = tmp_path / "ViT-tiny.pt"
  torch.jit.save(torch.jit.trace(oa.half(), torch.ones(1, dtype=torch.half)), str(archive))
  _assert_levels(bb.extract(bb.load(archive, cache=False), images), ref)


# --------------------------------------------------------------------------------- ImageBind
class _PadIm2Video(nn.Module):
  def forward(self, x):
    return x.unsqueeze(2).repeat(1, 1, 2, 1, 1)


class _IBBlock(nn.Module):
  def __init__(self, d, heads):
    super().__init__()
    self.attn = nn.MultiheadAttention(d, heads, bias=True)
    self.norm_1 = nn.LayerNorm(d, eps=1e-6)
    self.mlp = nn.Module()
    self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
    self.norm_2 = nn.LayerNorm(d, eps=1e-6)

  def forward(self, x):  # (L, B, D) like ImageBind's trunk
    y = self.norm_1(x)
    x = x + self.attn(y, y, y, need_weights=False)[0]
    return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm_2(x))))


class _ImageBindVision(nn.Module):
  """ImageBind's vision path with its official module names (other modalities as stubs)."""

  def __init__(self, d, depth, heads, patch, grid):
    super().__init__()
    pre = nn.Module()
    pre.rgbt_stem = nn.Module()
    pre.rgbt_stem.proj = nn.Sequential(
        _PadIm2Video(), nn.Conv3d(3, d, (2, patch, patch), (2, patch, patch), bias=False))
    pre.cls_token = nn.Parameter(torch.zeros(1, 1, d))
    pre.pos_embedding_helper = nn.Module()
    pre.pos_embedding_helper.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
    trunk = nn.Module()
    trunk.pre_transformer_layer = nn.Sequential(nn.LayerNorm(d, eps=1e-6), nn.Identity())
    trunk.blocks = nn.Sequential(*[_IBBlock(d, heads) for _ in range(depth)])
    self.modality_preprocessors = nn.ModuleDict({"vision": pre})
    self.modality_trunks = nn.ModuleDict({"vision": trunk, "text": nn.Linear(4, 4)})
    self.modality_heads = nn.ModuleDict(
        {"vision": nn.Sequential(nn.LayerNorm(d, eps=1e-6), nn.Linear(d, 8, bias=False))})

  def forward(self, x):
    pre = self.modality_preprocessors["vision"]
    trunk = self.modality_trunks["vision"]
    t = pre.rgbt_stem.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([pre.cls_token.expand(t.shape[0], -1, -1), t], 1)
    t = trunk.pre_transformer_layer(t + pre.pos_embedding_helper.pos_embed).transpose(0, 1)
    outs = []
    for blk in trunk.blocks:
      t = blk(t)
      outs.append(t.transpose(0, 1))
    return outs


def test_imagebind_matches_torch_conv3d_definition(tmp_path):
  d, depth, heads, patch, size = 32, 2, 2, 14, 56
  model = _ImageBindVision(d, depth, heads, patch, size // patch).eval()
  _randomise(model, 3)
  images = _images(2, size, seed=3)
  bb = get_backbone("imagebind", width=d, depth=depth, heads=heads, input_size=size,
                    taps=(1, 2))
  with torch.no_grad():
    ref = [_tokens_to_grid(h, size // patch) for h in model(_to_torch(images, bb.mean, bb.std))]
  path = tmp_path / "imagebind_tiny.pth"
  torch.save(model.state_dict(), path)
  _assert_levels(bb.extract(bb.load(path, cache=False), images), ref)


# --------------------------------------------------------------------------------- ResNet
class _Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5: stride on the 3 x 3)."""

  def __init__(self, cin, width, cout, stride):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class _WideResNet(nn.Module):
  def __init__(self, layers, stem, base, width_per_group):
    super().__init__()
    self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(stem)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = stem
    for li, n in enumerate(layers):
      planes = base * 2 ** li
      blocks = []
      for bi in range(n):
        blocks.append(_Bottleneck(cin, planes * width_per_group // 64, planes * 4,
                                  2 if (bi == 0 and li > 0) else 1))
        cin = planes * 4
      setattr(self, f"layer{li + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, 10)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    outs = []
    for li in range(1, 5):
      x = getattr(self, f"layer{li}")(x)
      outs.append(x)
    return outs


def test_wide_resnet_matches_torchvision_layout(tmp_path):
  layers, stem, base = (2, 1, 1, 1), 8, 8
  model = _WideResNet(layers, stem, base, 128).eval()
  _randomise(model, 4)
  images = _images(2, 64, seed=4)
  bb = get_backbone("wide-resnet50", layers=layers, stem=stem, base=base, input_size=64)
  assert bb.level_dims == (32, 64, 128, 256) and bb.level_strides == (4, 8, 16, 32)
  with torch.no_grad():
    ref = [o.numpy().transpose(0, 2, 3, 1) for o in model(_to_torch(images, bb.mean, bb.std))]
  path = tmp_path / "wrn_legacy.pth"  # the pre-1.6 serialisation, as old model zoos have
  torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
  _assert_levels(bb.extract(bb.load(path, cache=False), images), ref)


# --------------------------------------------------------------------------------- checks
def test_mismatched_checkpoints_are_rejected(tmp_path):
  model = _WideResNet((1, 1, 1, 1), 8, 8, 128)
  path = tmp_path / "wrn.pth"
  torch.save(model.state_dict(), path)
  with pytest.raises(mapping.ConversionError, match="missing"):
    get_backbone("tiny-vit").load(path, cache=False)
  with pytest.raises(mapping.ConversionError, match="shape mismatches"):
    get_backbone("wide-resnet50", layers=(1, 1, 1, 1), stem=8, base=16).load(path, cache=False)
  with pytest.raises(mapping.ConversionError, match="not used"):  # layer1 has 2 blocks in file
    torch.save(_WideResNet((2, 1, 1, 1), 8, 8, 128).state_dict(), path)
    get_backbone("wide-resnet50", layers=(1, 1, 1, 1), stem=8, base=8).load(path, cache=False)


def test_extract_checks_images_and_bfloat16_stays_close():
  bb = get_backbone("tiny-vit")
  assert bb.level_dims == (64,) * 4 and bb.level_strides == (14,) * 4
  params = bb.init(jax.random.key(0))
  images = _images(2, 224, seed=5)
  f32 = bb.extract(params, images)
  assert [lv.shape for lv in f32] == [(2, 16, 16, 64)] * 4
  bf16 = bb.extract(params, images, dtype=jnp.bfloat16)
  for a, b in zip(f32, bf16):
    rel = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(a))
    assert rel < 0.05, rel
  with pytest.raises(ValueError, match=r"\(B, S, S, 3\)"):
    bb.extract(params, images[..., :2])
  with pytest.raises(ValueError, match="multiple of the patch size"):
    bb.extract(params, _images(1, 100))
  with pytest.raises(ValueError, match="fixes the input at 224"):
    clip = get_backbone("clip-base", width=32, depth=1, heads=2, taps=(1,))
    clip.extract(clip.init(jax.random.key(0)), _images(1, 112))


# --------------------------------------------------------------------------------- real weights
def _imagenet_crop(image: np.ndarray, size: int = 224) -> np.ndarray:
  """Resize the short side to ``size`` (bicubic) and centre-crop: (size, size, 3) in [0, 1]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(image)
  w, h = img.size
  scale = size / min(w, h)
  img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
  w, h = img.size
  left, top = (w - size) // 2, (h - size) // 2
  img = img.crop((left, top, left + size, top + size))
  return np.asarray(img, np.float32) / 255.0


def test_efficientnet_lite0_real_weights_classify_imagenet_images(tmp_path):
  import skimage.data  # pylint: disable=g-import-not-at-top
  bb = get_backbone("efficientnet-lite0", with_head=True)
  params = bb.load(default_weights_path(), cache_dir=tmp_path)
  images = np.stack([_imagenet_crop(skimage.data.chelsea()), _imagenet_crop(skimage.data.coffee())])
  logits = np.asarray(bb.logits(params, images))
  assert logits.shape == (2, 1000)
  assert logits[0].argmax() == 285 and logits[1].argmax() == 967, logits.argmax(-1)
  # The same weights as a feature backbone, at the demo's smaller sizes and stride-16 taps.
  feat = get_backbone("efficientnet-lite0", taps=(8, 11), input_size=160)
  assert feat.level_dims == (80, 112) and feat.level_strides == (16, 16)
  fparams = feat.load(default_weights_path(), cache_dir=tmp_path)
  small = np.stack([_imagenet_crop(skimage.data.chelsea(), 160),
                    _imagenet_crop(skimage.data.coffee(), 160)])
  levels = feat.extract(fparams, small)
  assert [lv.shape for lv in levels] == [(2, 10, 10, 80), (2, 10, 10, 112)]
  assert all(np.isfinite(np.asarray(lv)).all() for lv in levels)


@pytest.mark.parametrize("impl", ["shift", "grouped"])
@pytest.mark.parametrize("size,kernel,stride", [(15, 3, 2), (16, 5, 2)])
def test_depthwise_conv_matches_torch_same_padding(impl, size, kernel, stride):
  """Both depthwise implementations equal torch's grouped conv with TF "SAME" padding."""
  from adjax.models.backbones import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, size, size, 8)).astype(np.float32)
  w = rng.standard_normal((8, 1, kernel, kernel)).astype(np.float32)
  out = -(-size // stride)
  pad = max((out - 1) * stride + kernel - size, 0)
  xt = torch.nn.functional.pad(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                               (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
  ref = torch.nn.functional.conv2d(xt, torch.from_numpy(w), stride=stride, groups=8)
  mod = layers.DepthwiseConv(kernel, stride, impl=impl)
  got = mod.apply({"params": {"kernel": mapping.depthwise2d(w)}}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), ref.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_unknown_override_is_an_error():
  with pytest.raises(ValueError, match="unknown options.*'tap'"):
    get_backbone("efficientnet-lite0", tap=(1, 2))
  with pytest.raises(ValueError, match="unknown options.*'widht'"):
    get_backbone("tiny-vit", widht=8)
  with pytest.raises(ValueError, match="taps must be"):
    get_backbone("dinov2-base", taps=(0, 3))
