"""The Vision Transformer shared by DINOv2, CLIP and ImageBind (patch tokens from tapped blocks).

One pre-norm ViT covers the three families; they differ only in switches:
- patch embedding with or without bias (ImageBind's two-frame Conv3d arrives already summed to
  a 2-D kernel by its mapping table);
- ``ln_pre`` after the embeddings (CLIP, ImageBind);
- LayerScale on both residual branches (DINOv2);
- activation: exact GELU or OpenAI's QuickGELU ``x * sigmoid(1.702 x)``; LayerNorm epsilon;
- the position table: fixed (CLIP, ImageBind) or resampled to the input grid exactly as
  DINOv2's ``interpolate_pos_encoding`` does (bicubic with ``scale_factor = (g + 0.1) / G``).

Blocks after the last tapped one are not built (their weights are not needed). Outputs are the
patch tokens (class token dropped) of each tapped block, before any final norm.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adjax.io import mapping
from adjax.models.matmul import accumulating_dot_general

if TYPE_CHECKING:  # base imports nothing from here; the import is lazy only to stay one-way
  from adjax.models.backbones import base

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as torch.nn.GELU()."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu, "quick_gelu": quick_gelu}


def _cubic_weights(t: float, a: float = -0.75) -> tuple[float, float, float, float]:
  """PyTorch's bicubic convolution weights for taps at -1, 0, 1, 2 (A = -0.75)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return far(t + 1), near(t), near(1 - t), far(2 - t)


def bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None) -> np.ndarray:
  """The (out, in) matrix of 1-D bicubic resampling as ``torch.nn.functional.interpolate``.

  Matches ``mode='bicubic', align_corners=False, antialias=False``: source coordinate
  ``(dst + 0.5) * step - 0.5`` with ``step = 1 / scale_factor`` when a scale factor is given
  (PyTorch uses it as is) and ``in / out`` otherwise; taps outside the input are clamped to the
  border.

  Args:
    in_size: input length.
    out_size: output length.
    scale_factor: the ``scale_factor`` passed to interpolate, or None for ``size=``.

  Returns:
    float64 matrix M with ``out = M @ in``.
  """
  step = 1.0 / scale_factor if scale_factor else in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    src = (o + 0.5) * step - 0.5
    base = math.floor(src)
    for k, w in enumerate(_cubic_weights(src - base)):
      m[o, min(max(base - 1 + k, 0), in_size - 1)] += w
  return m


def resize_pos_table(table: jax.Array, grid: int, new_grid: int,
                     offset: float | None) -> jax.Array:
  """Resample a (grid * grid, D) patch position table to (new_grid * new_grid, D).

  Args:
    table: patch rows of the position table (class-token row removed), row-major.
    grid: side of the stored table (37 for DINOv2).
    new_grid: side of the input's patch grid.
    offset: DINOv2's ``interpolate_offset`` (0.1): scale factor ``(new_grid + offset) / grid``
      (the sampling step is ``grid / (new_grid + offset)``, not ``grid / new_grid``). ``0`` or
      None resamples by size (what Hugging Face's Dinov2 does).

  Returns:
    The resampled table, same dtype.
  """
  if new_grid == grid:
    return table
  scale = (new_grid + offset) / grid if offset else None
  if scale is not None and math.floor(grid * scale) != new_grid:
    raise ValueError(f"position table {grid} x {grid} cannot be resampled to {new_grid} with "
                     f"offset {offset}")
  m = jnp.asarray(bicubic_matrix(grid, new_grid, scale), jnp.float32)
  t = table.astype(jnp.float32).reshape(grid, grid, -1)
  out = jnp.einsum("oi,pj,ijd->opd", m, m, t, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(new_grid * new_grid, -1).astype(table.dtype)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
  width: int
  heads: int
  mlp_dim: int
  act: str = "gelu"
  eps: float = 1e-6
  layer_scale: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    hd = d // self.heads
    dense = lambda f, name: nn.Dense(f, dtype=self.dtype, dot_general=accumulating_dot_general,
                                     name=name)
    norm = lambda name: nn.LayerNorm(epsilon=self.eps, use_fast_variance=False,
                                     dtype=self.dtype, name=name)
    ls = lambda name: (self.param(name, nn.initializers.constant(0.1), (d,))
                       if self.layer_scale else None)
    g1, g2 = ls("ls1"), ls("ls2")

    y = norm("norm1")(x)
    qkv = dense(3 * d, "qkv")(y).reshape(b, n, 3, self.heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    y = jax.nn.dot_product_attention(q, k, v).reshape(b, n, d)
    y = dense(d, "proj")(y)
    x = x + (y * g1.astype(y.dtype) if g1 is not None else y)

    y = norm("norm2")(x)
    y = ACTIVATIONS[self.act](dense(self.mlp_dim, "fc1")(y))
    y = dense(d, "fc2")(y)
    return x + (y * g2.astype(y.dtype) if g2 is not None else y)


class ViT(nn.Module):
  """Patch tokens of a ViT at the tapped blocks.

  Attributes:
    width: token dimension D.
    depth: number of blocks of the full model (only up to the last tap are built).
    heads: attention heads.
    mlp_dim: hidden size of the MLP.
    patch: patch size p.
    pos_grid: side G of the stored position table (G * G patch rows + 1 class row).
    taps: 1-based block numbers whose outputs are returned.
    act: 'gelu' or 'quick_gelu'.
    eps: LayerNorm epsilon.
    patch_bias: whether the patch embedding has a bias.
    ln_pre: LayerNorm after the embeddings (CLIP, ImageBind).
    layer_scale: LayerScale on both branches (DINOv2).
    interpolate_offset: None: the input grid must equal G; else DINOv2's position-table
      resampling with this offset (0.1 official; 0 = by size).
    dtype: compute dtype.
  """
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int
  pos_grid: int
  taps: Sequence[int]
  act: str = "gelu"
  eps: float = 1e-6
  patch_bias: bool = True
  ln_pre: bool = False
  layer_scale: bool = False
  interpolate_offset: float | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    b, s, _, _ = x.shape
    g = s // self.patch
    d = self.width
    x = nn.Conv(d, (self.patch, self.patch), strides=(self.patch, self.patch), padding="VALID",
                use_bias=self.patch_bias, dtype=self.dtype, name="patch_embed")(x)
    x = x.reshape(b, g * g, d)
    init = nn.initializers.normal(0.02)
    cls = self.param("cls_token", init, (d,))
    pos = self.param("pos_embed", init, (1 + self.pos_grid ** 2, d))
    if g != self.pos_grid and self.interpolate_offset is None:
      raise ValueError(f"fixed position table of {self.pos_grid} x {self.pos_grid} patches "
                       f"({self.pos_grid * self.patch} px); the input gives {g} x {g}")
    patch_pos = resize_pos_table(pos[1:], self.pos_grid, g, self.interpolate_offset)
    cls_tok = jnp.broadcast_to((cls + pos[0]).astype(x.dtype), (b, 1, d))
    x = jnp.concatenate([cls_tok, x + patch_pos.astype(x.dtype)], axis=1)
    if self.ln_pre:
      x = nn.LayerNorm(epsilon=self.eps, use_fast_variance=False, dtype=self.dtype,
                       name="ln_pre")(x)
    levels = []
    for i in range(max(self.taps)):
      x = Block(d, self.heads, self.mlp_dim, self.act, self.eps, self.layer_scale,
                dtype=self.dtype, name=f"blocks_{i}")(x)
      if i + 1 in self.taps:
        levels.append(x[:, 1:].reshape(b, g, g, d))
    return levels


def num_built_blocks(taps: Sequence[int]) -> int:
  """Blocks the module builds: up to the last tap."""
  return max(taps)


def block_rules(i: int, src: str, names: dict[str, str], *, fused_qkv: bool,
                layer_scale: bool) -> list[mapping.Rule]:
  """Mapping rules of one block.

  Args:
    i: block index (0-based).
    src: source prefix of this block, e.g. ``"blocks.3."``.
    names: source sub-names for keys 'norm1', 'norm2', 'fc1', 'fc2', 'proj', and either 'qkv'
      (fused) or 'q', 'k', 'v' (separate); 'ls1', 'ls2' when ``layer_scale``. Each value is the
      module name without '.weight' / '.bias', except 'qkv_w'/'qkv_b' style overrides: if
      ``names['qkv']`` ends with '_', '<name>weight' / '<name>bias' are used (for
      nn.MultiheadAttention's ``in_proj_weight``).
    fused_qkv: whether the source stores q, k, v as one fused tensor.
    layer_scale: whether LayerScale gammas are mapped.

  Returns:
    The block's rules.
  """
  t = f"blocks_{i}/"
  R = mapping.Rule
  rules = []
  for ours in ("norm1", "norm2"):
    rules += [R(t + ours + "/scale", src + names[ours] + ".weight"),
              R(t + ours + "/bias", src + names[ours] + ".bias")]
  for ours in ("proj", "fc1", "fc2"):
    rules += [R(t + ours + "/kernel", src + names[ours] + ".weight", mapping.linear),
              R(t + ours + "/bias", src + names[ours] + ".bias")]
  if fused_qkv:
    base = names["qkv"]
    w, bias = (base + "weight", base + "bias") if base.endswith("_") else (
        base + ".weight", base + ".bias")
    rules += [R(t + "qkv/kernel", src + w, mapping.linear), R(t + "qkv/bias", src + bias)]
  else:
    qkv = [src + names[c] for c in ("q", "k", "v")]
    rules += [R(t + "qkv/kernel", tuple(n + ".weight" for n in qkv), mapping.stack_linear),
              R(t + "qkv/bias", tuple(n + ".bias" for n in qkv), mapping.stack_bias)]
  if layer_scale:
    rules += [R(t + "ls1", src + names["ls1"]), R(t + "ls2", src + names["ls2"])]
  return rules


def fixed_size_backbone(name: str, cfg: dict[str, Any], act: str,
                        convert: Callable[..., Any]) -> "base.Backbone":
  """A pre-LN ViT without patch bias, with ln_pre, at its trained input size (CLIP, ImageBind).

  Args:
    name: registry name.
    cfg: the resolved configuration (width, depth, heads, mlp_dim, patch, taps, input_size,
      eps, mean, std).
    act: "quick_gelu" (OpenAI CLIP) or "gelu" (ImageBind).
    convert: `(state, template, source, *, n_blocks, name) -> params`.
  """
  from adjax.models.backbones import base
  taps = base.taps_to_levels(cfg["taps"], cfg["depth"], name)
  grid = cfg["input_size"] // cfg["patch"]
  module = ViT(width=cfg["width"], depth=cfg["depth"], heads=cfg["heads"],
               mlp_dim=cfg["mlp_dim"], patch=cfg["patch"], pos_grid=grid, taps=taps,
               act=act, eps=cfg["eps"], patch_bias=False, ln_pre=True,
               layer_scale=False, interpolate_offset=None)
  n_blocks = num_built_blocks(taps)

  def conv(state, template, source):
    return convert(state, template, source, n_blocks=n_blocks, name=name)

  return base.Backbone(
      name=name, module=module, input_size=cfg["input_size"], mean=tuple(cfg["mean"]),
      std=tuple(cfg["std"]), level_dims=(cfg["width"],) * len(taps),
      level_strides=(cfg["patch"],) * len(taps), convert=conv, config=cfg, fixed_size=True,
      size_multiple=cfg["patch"])
