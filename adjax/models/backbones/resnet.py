"""Wide-ResNet-50-2 in the torchvision layout (the PatchCore / PaDiM backbone).

Bottleneck blocks with the stride on the 3 x 3 convolution (torchvision's v1.5), width
``planes * width_per_group / 64`` (128 for the wide variant), frozen BatchNorm (eps 1e-5).
Levels are the outputs of layer1..layer4 (strides 4, 8, 16, 32; 256, 512, 1024, 2048 channels).
Weights: torchvision's ``wide_resnet50_2-*.pth`` state dict (keys ``layer1.0.conv1.weight`` ...).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from adjax.io import mapping
from adjax.models.backbones import base
from adjax.models.backbones import layers


class Bottleneck(nn.Module):
  """torchvision Bottleneck: 1x1 -> 3x3 (stride) -> 1x1, plus a projected shortcut if needed."""
  width: int
  out: int
  stride: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, s, p, name: nn.Conv(f, (k, k), strides=(s, s), padding=((p, p), (p, p)),
                                            use_bias=False, dtype=self.dtype, name=name)
    bn = lambda name: layers.FrozenBatchNorm(1e-5, dtype=self.dtype, name=name)
    y = nn.relu(bn("bn1")(conv(self.width, 1, 1, 0, "conv1")(x)))
    y = nn.relu(bn("bn2")(conv(self.width, 3, self.stride, 1, "conv2")(y)))
    y = bn("bn3")(conv(self.out, 1, 1, 0, "conv3")(y))
    if self.downsample:
      x = bn("downsample_1")(conv(self.out, 1, self.stride, 0, "downsample_0")(x))
    return nn.relu(y + x)


class ResNet(nn.Module):
  """Bottleneck ResNet returning the outputs of the tapped layers (1..4).

  Attributes:
    layers: blocks per layer.
    taps: 1-based layer numbers whose outputs are returned.
    stem: channels of the 7 x 7 stem.
    base: planes of layer1 (doubling per layer); output channels are 4 * planes.
    width_per_group: torchvision's ``width_per_group`` (64 plain, 128 wide).
    dtype: compute dtype.
  """
  layers: Sequence[int] = (3, 4, 6, 3)
  taps: Sequence[int] = (1, 2, 3, 4)
  stem: int = 64
  base: int = 64
  width_per_group: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    x = nn.Conv(self.stem, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, name="conv1")(x)
    x = nn.relu(layers.FrozenBatchNorm(1e-5, dtype=self.dtype, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    levels = []
    cin = self.stem
    for li in range(max(self.taps)):
      planes = self.base * 2 ** li
      width = planes * self.width_per_group // 64
      out = planes * 4
      for bi in range(self.layers[li]):
        stride = 2 if (bi == 0 and li > 0) else 1
        x = Bottleneck(width, out, stride, downsample=(bi == 0 and (stride != 1 or cin != out)),
                       dtype=self.dtype, name=f"layer{li + 1}_{bi}")(x)
        cin = out
      if li + 1 in self.taps:
        levels.append(x)
    return levels


def rules(cfg: Mapping[str, Any]) -> list[mapping.Rule]:
  """Mapping table torchvision -> ``ResNet`` params for the layers the module builds."""
  out = [layers.conv_rule("conv1", "conv1")] + layers.bn_rules("bn1", "bn1")
  cin = cfg["stem"]
  for li in range(max(cfg["taps"])):
    cout = cfg["base"] * 2 ** li * 4
    for bi in range(cfg["layers"][li]):
      t, s = f"layer{li + 1}_{bi}/", f"layer{li + 1}.{bi}."
      for j in (1, 2, 3):
        out += [layers.conv_rule(t + f"conv{j}", s + f"conv{j}")]
        out += layers.bn_rules(t + f"bn{j}", s + f"bn{j}")
      if bi == 0 and (li > 0 or cin != cout):
        out += [layers.conv_rule(t + "downsample_0", s + "downsample.0")]
        out += layers.bn_rules(t + "downsample_1", s + "downsample.1")
      cin = cout
  return out


def make(name: str, **overrides: Any) -> base.Backbone:
  """Build the Wide-ResNet-50-2 backbone.

  Args:
    name: 'wide-resnet50'.
    **overrides: any of layers, taps (1-based layer numbers), stem, base, width_per_group,
      input_size, mean, std.

  Returns:
    The backbone (any input size).
  """
  cfg = dict(layers=(3, 4, 6, 3), taps=(1, 2, 3, 4), stem=64, base=64, width_per_group=128,
             input_size=224, mean=base.IMAGENET_MEAN, std=base.IMAGENET_STD)
  base.check_overrides(name, overrides, list(cfg))
  cfg.update(overrides)
  taps = base.taps_to_levels(cfg["taps"], 4, name)
  cfg["taps"], cfg["layers"] = taps, tuple(cfg["layers"])
  module = ResNet(layers=cfg["layers"], taps=taps, stem=cfg["stem"], base=cfg["base"],
                  width_per_group=cfg["width_per_group"])
  table = rules(cfg)
  last = max(taps)

  def conv(state, template, source):
    state = mapping.strip_prefix(state, ("module.",))
    ignore = [r"fc\..*", layers.NUM_BATCHES_TRACKED,
              lambda k: k.startswith("layer") and k[5:6].isdigit() and int(k[5]) > last]
    return mapping.apply_rules(state, table, template, ignore=ignore, source=source,
                               model=name)

  return base.Backbone(
      name=name, module=module, input_size=cfg["input_size"], mean=tuple(cfg["mean"]),
      std=tuple(cfg["std"]), level_dims=tuple(cfg["base"] * 2 ** (t - 1) * 4 for t in taps),
      level_strides=tuple(2 ** (t + 1) for t in taps), convert=conv, config=cfg)
