"""PaDiM: one Gaussian per grid position and level, scored by Mahalanobis distance.

docs/method.md section 6 (and the reference's padim/train_val.py): all 4 levels, each on its own;
per
grid position the mean and the unbiased covariance + 0.01 I of the training features; a test
token's score is sqrt((x - mu)^T Sigma^-1 (x - mu)); each level's map is upsampled bilinearly
(align corners) to the image, the levels averaged, smoothed with a Gaussian of sigma 4; the
image score is the map's maximum.

We keep the Cholesky factor of each covariance rather than its inverse: the Mahalanobis form is
|L^-1 (x - mu)|^2, computed by a triangular solve, which is cheaper and more accurate.
The (h w, C, C) covariances are built and factored a block of positions at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from adjax.methods.base import MethodFacts
from adjax.methods import common


@dataclasses.dataclass(frozen=True)
class PaDiM(MethodFacts):
  """Settings of PaDiM (defaults: docs/method.md section 6).

  Attributes:
    eps: ridge added to every covariance.
    sigma: Gaussian smoothing of the map, pixels.
    num_levels: use the last this many levels (None: all).
    position_block: grid positions per block (covariance, factorisation and scoring).
  """
  checkpoint = "angle"
  eps: float = 0.01
  sigma: float = 4.0
  num_levels: int | None = None
  position_block: int = 16

  name = "padim"

  def fit(self, train_levels: Any, rng: jax.Array | None = None) -> dict:
    """Fits the per-position Gaussians.

    Args:
      train_levels: list of (N, h_k, w_k, C_k), N >= 2.
      rng: unused (PaDiM is deterministic).

    Returns:
      {"mean": [(h_k w_k, C_k)], "chol": [(h_k w_k, C_k, C_k)] lower Cholesky factors}.
    """
    del rng
    levels = common.last_levels(common.check_levels(train_levels, "train_levels"),
                                self.num_levels)
    if levels[0].shape[0] < 2:
      raise ValueError("padim: need at least 2 training images for a covariance, got "
                       f"{levels[0].shape[0]}")
    # Level by level to the end: two levels' batched Cholesky factorisations running at once
    # can deadlock the CPU runtime (see _score).
    means, chols = zip(*[jax.block_until_ready(_fit_level(self, x)) for x in levels])
    return {"mean": list(means), "chol": list(chols),
            "grids": [tuple(x.shape[1:3]) for x in levels]}

  def score(self, state: dict, test_levels: Any, image_size: Any):
    """Scores test images.

    Args:
      state: from `fit`.
      test_levels: list of (M, h_k, w_k, C_k) on the training grids.
      image_size: int or (H, W).

    Returns:
      (image_scores (M,), maps (M, H, W)) float32.
    """
    levels = common.last_levels(common.check_levels(test_levels, "test_levels"),
                                self.num_levels)
    if [tuple(x.shape[1:3]) for x in levels] != [tuple(g) for g in state["grids"]]:
      raise ValueError(f"padim: test grids {[x.shape[1:3] for x in levels]} differ from the "
                       f"training grids {state['grids']}")
    return _score(self, tuple(levels), tuple(state["mean"]), tuple(state["chol"]),
                  common.image_hw(image_size))


def _blocks(x: jax.Array, block: int) -> tuple[jax.Array, int]:
  """Splits axis 0 of x into (num_blocks, block, ...), zero padded; returns the pad."""
  pad = (-x.shape[0]) % block
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape((-1, block) + x.shape[1:]), pad


@functools.partial(jax.jit, static_argnums=(0,))
def _fit_level(cfg: PaDiM, x: jax.Array):
  n, h, w, c = x.shape
  tokens = x.reshape(n, h * w, c).transpose(1, 0, 2)  # (L, N, C)
  mean = tokens.mean(axis=1)
  eye = jnp.eye(c, dtype=jnp.float32)

  def factor(args):
    t, mu = args
    d = t - mu[:, None, :]
    cov = jnp.einsum("lnc,lnd->lcd", d, d, precision=common.HIGHEST) / (n - 1) + cfg.eps * eye
    return jnp.linalg.cholesky(cov)

  block = min(cfg.position_block, h * w)
  tb, pad = _blocks(tokens, block)
  mb, _ = _blocks(mean, block)
  chol = jax.lax.map(factor, (tb, mb)).reshape(-1, c, c)
  return mean, chol[:h * w]


def mahalanobis(x: jax.Array, mean: jax.Array, chol: jax.Array, block: int) -> jax.Array:
  """sqrt((x - mu)^T Sigma^-1 (x - mu)) per token, Sigma = chol chol^T.

  Args:
    x: (M, L, C) tokens.
    mean: (L, C).
    chol: (L, C, C) lower Cholesky factors.
    block: positions per block.

  Returns:
    (M, L).
  """
  m, l, c = x.shape

  def one(args):
    xs, mu, lo = args  # (b, M, C), (b, C), (b, C, C)
    d = (xs - mu[:, None, :]).transpose(0, 2, 1)  # (b, C, M)
    z = solve_triangular(lo, d, lower=True)
    return jnp.sqrt(jnp.sum(z * z, axis=1))  # (b, M)

  block = min(block, l)
  xb, _ = _blocks(x.transpose(1, 0, 2), block)
  mb, _ = _blocks(mean, block)
  # Padded positions get an identity factor, so the solve stays finite.
  cb, pad = _blocks(chol, block)
  if pad:
    eye = jnp.eye(c, dtype=chol.dtype)
    cb = cb.reshape(-1, c, c).at[l:].set(eye).reshape(cb.shape)
  out = jax.lax.map(one, (xb, mb, cb)).reshape(-1, m)[:l]
  return out.T


@functools.partial(jax.jit, static_argnums=(0, 4))
def _score(cfg: PaDiM, levels: tuple, means: tuple, chols: tuple, hw: tuple[int, int]):
  token_maps = []
  for x, mu, lo in zip(levels, means, chols):
    m, h, w, c = x.shape
    if token_maps:
      # One level's solves after the other's. The CPU runtime runs independent parts of a
      # program at once, and two batched LAPACK triangular solves that each wait on the same
      # small thread pool for their batch can deadlock (seen with jaxlib 0.10 on 2 cores). A
      # real data dependency (a float times zero is not folded away) orders them.
      x = x + 0.0 * jnp.nan_to_num(token_maps[-1][0, 0, 0])
    token_maps.append(mahalanobis(x.reshape(m, h * w, c), mu, lo,
                                  cfg.position_block).reshape(m, h, w))
  maps = common.token_maps_to_image(token_maps, hw, align_corners=True, sigma=cfg.sigma)
  return maps.reshape(maps.shape[0], -1).max(axis=1), maps
