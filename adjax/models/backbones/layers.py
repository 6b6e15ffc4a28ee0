"""Small layers shared by the CNN backbones: frozen BatchNorm, depthwise conv, mapping rules."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adjax.io import mapping


class FrozenBatchNorm(nn.Module):
  """BatchNorm in inference mode: running statistics, never updated.

  The four tensors live in the ``params`` collection (scale, bias, mean, var) so a backbone's
  weights are one tree; nothing here is trained.

  Attributes:
    eps: epsilon added to the variance.
    dtype: compute dtype of the output.
  """
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    # Fold the statistics into one affine map in float32, then apply it in the compute dtype.
    mul = scale * jax.lax.rsqrt(var + self.eps)
    add = bias - mean * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow "SAME" padding (the extra pixel goes after), as lax's 'SAME'."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution with "SAME" padding, no bias; kernel (k, k, 1, C).

  On CPU, XLA's grouped convolution is 5-25x slower than a sum of k * k shifted, strided
  slices times per-channel weights (measured on EfficientNet-Lite0's layers), so CPU uses the
  shifted sum; other backends use the grouped convolution. Both give the same numbers up to
  float rounding.

  Attributes:
    kernel_size: k.
    stride: spatial stride.
    dtype: compute dtype.
    impl: 'auto' (by backend), 'shift' or 'grouped'.
  """
  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    k, s = self.kernel_size, self.stride
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c))
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    impl = self.impl
    if impl == "auto":
      impl = "shift" if jax.default_backend() == "cpu" else "grouped"
    if impl == "grouped":
      return jax.lax.conv_general_dilated(
          x, kernel, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=c)
    b, h, w, _ = x.shape
    ph, pw = _same_padding(h, k, s), _same_padding(w, k, s)
    oh, ow = -(-h // s), -(-w // s)
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    out = None
    for i in range(k):
      for j in range(k):
        tap = jax.lax.slice(xp, (0, i, j, 0), (b, i + (oh - 1) * s + 1, j + (ow - 1) * s + 1, c),
                            (1, s, s, 1)) * kernel[i, j, 0]
        out = tap if out is None else out + tap
    return out


def bn_rules(target: str, source: str) -> list[mapping.Rule]:
  """Rules for a torch BatchNorm2d ``source`` (prefix without the dot) -> ``target``."""
  R = mapping.Rule
  return [R(f"{target}/scale", f"{source}.weight"), R(f"{target}/bias", f"{source}.bias"),
          R(f"{target}/mean", f"{source}.running_mean"),
          R(f"{target}/var", f"{source}.running_var")]


def conv_rule(target: str, source: str) -> mapping.Rule:
  """Rule for a bias-free torch Conv2d weight -> Flax Conv kernel."""
  return mapping.Rule(f"{target}/kernel", f"{source}.weight", mapping.conv2d)


NUM_BATCHES_TRACKED = r".*\.num_batches_tracked"
