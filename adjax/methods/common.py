"""Pieces the downstream detectors share (docs/method.md section 6).

Everything here is a pure function of arrays. The resampling operators (bilinear upsampling,
Gaussian smoothing, adaptive average pooling) are linear maps along one axis, so each is built
once per shape as a small dense matrix in numpy and applied with one matmul: that reproduces
PyTorch's `interpolate` / `adaptive_avg_pool1d` and scipy's `gaussian_filter` exactly (up to
float rounding), runs at matmul speed on any accelerator, and needs no gather.

Arrays are channels-last: feature levels are (N, h, w, C), maps are (M, H, W).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Levels = list  # list of (N, h_k, w_k, C_k) arrays, one per backbone level.

# Distances and smoothing are numerics we compare against references: ask for full f32
# matmuls (on GPUs the default may be TF32).
HIGHEST = jax.lax.Precision.HIGHEST


def image_hw(image_size: Any) -> tuple[int, int]:
  """`image_size` as (H, W): an int means a square image."""
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  hw = tuple(int(s) for s in image_size)
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
  return hw  # type: ignore[return-value]


def check_levels(levels: Any, what: str, *, min_levels: int = 1) -> list:
  """Validates a list of feature levels; returns it as a list of float32 jax arrays.

  Args:
    levels: list of (N, h_k, w_k, C_k) arrays with the same N.
    what: the argument's name, for error messages.
    min_levels: the fewest levels accepted.

  Returns:
    The levels as float32 jax arrays.
  """
  if isinstance(levels, (np.ndarray, jax.Array)) or not isinstance(levels, (list, tuple)):
    raise ValueError(f"{what} must be a list of (N, h, w, C) arrays, one per level; got "
                     f"{type(levels).__name__}")
  if len(levels) < min_levels:
    raise ValueError(f"{what} has {len(levels)} levels, at least {min_levels} needed")
  out = []
  for k, x in enumerate(levels):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{what}[{k}] must be (N, h, w, C), got shape "
                       f"{getattr(x, 'shape', None)}")
    if x.shape[0] != levels[0].shape[0]:
      raise ValueError(f"{what}[{k}] has {x.shape[0]} samples, {what}[0] has "
                       f"{levels[0].shape[0]}")
    out.append(jnp.asarray(x, jnp.float32))
  if out[0].shape[0] < 1:
    raise ValueError(f"{what} holds no samples")
  return out


def last_levels(levels: Sequence[Any], n: int | None) -> list:
  """The last `n` levels (all when n is None or there are fewer than n).

  docs/method.md names levels for K = 4 backbones (PatchCore 2-4, CFLOW the last 3, GLASS the last
  2): all of these are "the last n", which is also the sensible choice for backbones that give
  fewer levels (the deepest ones carry the most semantic information).
  """
  if n is None or n >= len(levels):
    return list(levels)
  return list(levels[-n:])


# ----------------------------------------------------------------------------- resampling


@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
  """(out_size, in_size) matrix of 1-D linear interpolation as PyTorch's `interpolate`.

  align_corners=False: source coordinate (dst + 0.5) * in / out - 0.5, clamped at 0 (PyTorch
  clamps negative coordinates; the upper edge repeats the last sample).
  align_corners=True: source coordinate dst * (in - 1) / (out - 1).
  """
  dst = np.arange(out_size, dtype=np.float64)
  if align_corners:
    src = dst * ((in_size - 1) / (out_size - 1)) if out_size > 1 else np.zeros_like(dst)
  else:
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1.0 - lam)
  np.add.at(m, (rows, i1), lam)
  return m.astype(np.float32)


def resize_maps(maps: jax.Array, size: Any, *, align_corners: bool) -> jax.Array:
  """Bilinear resize of (M, h, w) maps to (M, H, W), as PyTorch's `interpolate`.

  Args:
    maps: (M, h, w) array.
    size: int or (H, W).
    align_corners: PyTorch's flag of the same name.

  Returns:
    (M, H, W) float32.
  """
  hh, ww = image_hw(size)
  mh = jnp.asarray(bilinear_matrix(maps.shape[1], hh, align_corners))
  mw = jnp.asarray(bilinear_matrix(maps.shape[2], ww, align_corners))
  return jnp.einsum("Hh,mhw,Ww->mHW", mh, maps.astype(jnp.float32), mw, precision=HIGHEST)


def resize_features(x: jax.Array, hw: tuple[int, int], *, align_corners: bool) -> jax.Array:
  """Bilinear resize of channels-last features (N, h, w, C) to (N, H, W, C)."""
  if tuple(x.shape[1:3]) == tuple(hw):
    return x
  mh = jnp.asarray(bilinear_matrix(x.shape[1], hw[0], align_corners))
  mw = jnp.asarray(bilinear_matrix(x.shape[2], hw[1], align_corners))
  return jnp.einsum("Hh,nhwc,Ww->nHWc", mh, x, mw, precision=HIGHEST)


@functools.lru_cache(maxsize=64)
def gaussian_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
  """(size, size) matrix of scipy's `gaussian_filter1d` (mode 'reflect', truncate 4).

  scipy's 'reflect' mirrors about the edge, repeating the edge sample (d c b a | a b c d);
  the index folding below handles kernels wider than the signal as scipy does.
  """
  radius = int(truncate * float(sigma) + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  phi = np.exp(-0.5 * (x / sigma) ** 2)
  phi /= phi.sum()
  m = np.zeros((size, size), np.float64)
  rows = np.arange(size)
  period = 2 * size
  for off, wgt in zip(range(-radius, radius + 1), phi):
    src = np.mod(rows + off, period)
    src = np.where(src >= size, period - 1 - src, src)
    np.add.at(m, (rows, src), wgt)
  return m.astype(np.float32)


def gaussian_blur(maps: jax.Array, sigma: float = 4.0) -> jax.Array:
  """Smooths each (H, W) map as scipy.ndimage.gaussian_filter(map, sigma) does.

  Args:
    maps: (M, H, W).
    sigma: standard deviation in pixels; 0 returns the maps unchanged.

  Returns:
    (M, H, W) float32.
  """
  if not sigma:
    return maps.astype(jnp.float32)
  gh = jnp.asarray(gaussian_matrix(maps.shape[1], float(sigma)))
  gw = jnp.asarray(gaussian_matrix(maps.shape[2], float(sigma)))
  return jnp.einsum("Hh,mhw,Ww->mHW", gh, maps.astype(jnp.float32), gw, precision=HIGHEST)


def token_maps_to_image(token_maps: Sequence[jax.Array], image_size: Any, *,
                        align_corners: bool, sigma: float) -> jax.Array:
  """Upsamples per-level token score maps to the image, averages them, smooths.

  Args:
    token_maps: list of (M, h_k, w_k) score maps.
    image_size: int or (H, W).
    align_corners: bilinear mode (PatchCore: False; FeatureNorm and PaDiM: True).
    sigma: Gaussian smoothing in pixels (0: none).

  Returns:
    (M, H, W) float32.
  """
  up = [resize_maps(m, image_size, align_corners=align_corners) for m in token_maps]
  return gaussian_blur(sum(up[1:], up[0]) / len(up), sigma)


@functools.lru_cache(maxsize=64)
def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(in_size, out_size) matrix of PyTorch's `adaptive_avg_pool1d`.

  Output i averages inputs [floor(i * in / out), ceil((i + 1) * in / out)).
  """
  m = np.zeros((in_size, out_size), np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[start:end, i] = 1.0 / (end - start)
  return m.astype(np.float32)


def adaptive_avg_pool(x: jax.Array, out_size: int) -> jax.Array:
  """Adaptive 1-D average pooling of the last axis, as `F.adaptive_avg_pool1d`."""
  n_in = x.shape[-1]
  if n_in == out_size:
    return x
  if n_in % out_size == 0:
    # Equal, disjoint windows (e.g. 9 x 1024 -> 1024): a reshaped mean, no matmul.
    return x.reshape(x.shape[:-1] + (out_size, n_in // out_size)).mean(-1)
  p = jnp.asarray(adaptive_pool_matrix(n_in, out_size))
  return jnp.matmul(x, p, precision=HIGHEST)


def neighbourhood_3x3(x: jax.Array) -> jax.Array:
  """Each token's 3 x 3 neighbourhood (zero padding), flattened channel-major.

  This is PyTorch's `Unfold(kernel_size=3, padding=1)` followed by the reshape that PatchCore
  uses: the 9C values of a token are ordered (C, kh, kw), which matters because the adaptive
  pooling that follows averages runs of neighbouring values.

  Args:
    x: (N, h, w, C).

  Returns:
    (N, h, w, 9 C).
  """
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  shifts = [xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]
  return jnp.stack(shifts, axis=-1).reshape(n, h, w, c * 9)


def average_3x3(x: jax.Array) -> jax.Array:
  """3 x 3 average of each token's neighbourhood (zero padding, divide by 9)."""
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)) / 9.0


def aggregate_levels(levels: Sequence[jax.Array], embed_dim: int,
                     target_dim: int) -> jax.Array:
  """PatchCore's (and GLASS's) locally aware patch features.

  Each level: 3 x 3 neighbourhood, bilinearly resized (align_corners False) to the first
  level's grid, adaptive-average-pooled from 9C to `embed_dim`; the levels' vectors are then
  stacked (level-major) and pooled again to `target_dim`. Pooling and resizing are linear on
  different axes, so pooling first gives the same numbers with 9x less resizing work.

  Args:
    levels: list of (N, h_k, w_k, C_k).
    embed_dim: per-level dimension after the first pooling (PatchCore: 1024).
    target_dim: final dimension (PatchCore: 1024).

  Returns:
    (N, h_0, w_0, target_dim).
  """
  hw = tuple(levels[0].shape[1:3])
  pooled = []
  for x in levels:
    y = adaptive_avg_pool(neighbourhood_3x3(x), embed_dim)
    pooled.append(resize_features(y, hw, align_corners=False))
  stacked = jnp.concatenate(pooled, axis=-1)  # (N, h, w, K * embed_dim), level-major
  return adaptive_avg_pool(stacked, target_dim)


# ----------------------------------------------------------------------------- positions


def sinusoidal_position_2d(dim: int, h: int, w: int) -> np.ndarray:
  """CFLOW's 2-D sinusoidal position code, channels-last: (h, w, dim).

  The first half of the channels encodes the column (sin on even, cos on odd channels), the
  second half the row, with frequencies 1e4^(-2i / (dim / 2)).
  """
  if dim % 4:
    raise ValueError(f"position code dimension must be a multiple of 4, got {dim}")
  half = dim // 2
  div = np.exp(np.arange(0.0, half, 2) * -(math.log(1e4) / half))
  pw = np.arange(w, dtype=np.float64)[:, None] * div  # (w, half/2)
  ph = np.arange(h, dtype=np.float64)[:, None] * div  # (h, half/2)
  p = np.zeros((h, w, dim), np.float64)
  p[:, :, 0:half:2] = np.sin(pw)[None, :, :]
  p[:, :, 1:half:2] = np.cos(pw)[None, :, :]
  p[:, :, half::2] = np.sin(ph)[:, None, :]
  p[:, :, half + 1::2] = np.cos(ph)[:, None, :]
  return p.astype(np.float32)


# ----------------------------------------------------------------------------- noise masks


def perlin_noise(rng: jax.Array, shape: tuple[int, int], res: Any,
                 max_res: int | None = None) -> jax.Array:
  """2-D Perlin gradient noise on a (H, W) grid with res[0] x res[1] cells, in about [-1, 1].

  `res` may be traced (drawn inside jit): the gradient lattice is allocated for `max_res`
  cells and corners are picked with one-hot matmuls, which compile quickly, unlike gathers.

  Args:
    rng: PRNG key.
    shape: (H, W) of the output.
    res: (cells along H, cells along W), each in [1, max_res].
    max_res: static upper bound of res (default: max(shape)).

  Returns:
    (H, W) float32.
  """
  hh, ww = shape
  max_res = max(hh, ww) if max_res is None else max_res
  ry = jnp.asarray(res[0], jnp.float32)
  rx = jnp.asarray(res[1], jnp.float32)
  angles = jax.random.uniform(rng, (max_res + 1, max_res + 1), maxval=2 * jnp.pi)
  gy, gx = jnp.sin(angles), jnp.cos(angles)
  y = (jnp.arange(hh) + 0.5) * ry / hh
  x = (jnp.arange(ww) + 0.5) * rx / ww
  yi, xi = jnp.floor(y), jnp.floor(x)
  fy, fx = (y - yi)[:, None], (x - xi)[None, :]
  oy = [jax.nn.one_hot(yi + d, max_res + 1) for d in (0, 1)]  # (H, R + 1)
  ox = [jax.nn.one_hot(xi + d, max_res + 1) for d in (0, 1)]  # (W, R + 1)

  def corner(dy, dx):
    pick = lambda g: oy[dy] @ g @ ox[dx].T
    return pick(gy) * (fy - dy) + pick(gx) * (fx - dx)

  fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)
  u, v = fade(fx), fade(fy)
  top = corner(0, 0) * (1 - u) + corner(0, 1) * u
  bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
  return (top * (1 - v) + bottom * v) * jnp.sqrt(2.0)


def perlin_mask(rng: jax.Array, shape: tuple[int, int], *, threshold: float = 0.5,
                max_res: int = 4) -> jax.Array:
  """A binary Perlin-noise mask (GLASS/DRAEM style) with at least one set cell.

  The cell count per axis is 2^k with k drawn uniformly from [0, log2(max_res)] (capped by
  the grid side); the mask is noise > threshold. If the draw sets nothing, the cell with the
  largest noise is set, so every synthesized sample carries a defect.

  Returns:
    (H, W) float32 in {0, 1}.
  """
  k_res, k_noise = jax.random.split(rng)
  levels = int(math.log2(max_res)) + 1
  res = jnp.minimum(2 ** jax.random.randint(k_res, (2,), 0, levels),
                    jnp.asarray(shape))
  noise = perlin_noise(k_noise, shape, res, max_res=max_res)
  mask = (noise > threshold).astype(jnp.float32)
  fallback = (noise >= noise.max()).astype(jnp.float32)
  return jnp.where(mask.sum() > 0, mask, fallback)


# ----------------------------------------------------------------------------- parameters


def host_rng(rng: jax.Array) -> np.random.Generator:
  """A numpy Generator seeded from a JAX PRNG key (typed or raw uint32).

  Parameter initialisation runs once on the host: drawing it with numpy avoids compiling a
  threefry graph per parameter shape, which costs more than the draw itself on CPU.
  """
  key = jnp.asarray(rng)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


def torch_linear_init(gen: np.random.Generator, fan_in: int, fan_out: int, *,
                      bias: bool = True) -> dict:
  """A dense layer initialised as torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Args:
    gen: numpy Generator (see `host_rng`).
    fan_in, fan_out: dimensions.
    bias: whether to make a bias.

  Returns:
    {"w": (fan_in, fan_out), "b": (fan_out,)} float32 jax arrays (no "b" without bias).
  """
  bound = 1.0 / math.sqrt(fan_in)
  p = {"w": jnp.asarray(gen.uniform(-bound, bound, (fan_in, fan_out)), jnp.float32)}
  if bias:
    p["b"] = jnp.asarray(gen.uniform(-bound, bound, (fan_out,)), jnp.float32)
  return p


def dense(p: dict, x: jax.Array) -> jax.Array:
  """x W + b for a layer made by `torch_linear_init`."""
  y = x @ p["w"]
  return y + p["b"] if "b" in p else y


def round_length(method: str, epochs: int, every: int | None, default: int) -> int:
  """Epochs between the states `fit_in_rounds` yields (`every`, else `default`), checking
  both it and the method's `epochs`."""
  if epochs < 1:
    raise ValueError(f"{method}: epochs must be >= 1, got {epochs}")
  every = default if every is None else int(every)
  if every < 1:
    raise ValueError(f"{method}: every must be >= 1 epoch, got {every}")
  return every


def epoch_steps(num_items: int, batch_size: int) -> int:
  """Steps per epoch when every epoch visits a permutation in full batches (at least 1)."""
  return max(1, num_items // max(1, batch_size))


# ----------------------------------------------------------------------------- training sets


def training_subset(num_normal: int, num_anomalous: int = 0, *, shots: int | None = None,
                    noise_ratio: float = 0.0,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Which images train a detector in the few-shot and noisy-training settings.

  Few-shot: `shots` normal training images per class (the paper uses 1, 2, 4, 8), drawn at
  random. Noisy training: anomalous images (from the class's test set) mixed in so that they
  are `noise_ratio` of the training set (the paper uses 0.1); the caller must remove those
  images from the test set it evaluates on.

  Args:
    num_normal: normal training images available for the class.
    num_anomalous: anomalous images available to mix in.
    shots: normal images to keep (None: all).
    noise_ratio: share of anomalous images in the resulting training set, in [0, 1).
    seed: draw seed (numpy).

  Returns:
    (normal indices, anomalous indices), sorted int64 arrays.
  """
  if shots is not None and not 1 <= shots <= num_normal:
    raise ValueError(f"shots must be in [1, {num_normal}], got {shots}")
  if not 0.0 <= noise_ratio < 1.0:
    raise ValueError(f"noise_ratio must be in [0, 1), got {noise_ratio}")
  gen = np.random.default_rng(seed)
  n = num_normal if shots is None else shots
  normal = np.sort(gen.choice(num_normal, n, replace=False))
  # a / (n + a) = ratio  =>  a = ratio * n / (1 - ratio), rounded.
  want = int(round(noise_ratio * n / (1.0 - noise_ratio)))
  if want > num_anomalous:
    raise ValueError(f"noise_ratio {noise_ratio} needs {want} anomalous images, only "
                     f"{num_anomalous} available")
  anomalous = np.sort(gen.choice(num_anomalous, want, replace=False)) if want else \
      np.zeros((0,), np.int64)
  return normal.astype(np.int64), anomalous.astype(np.int64)
