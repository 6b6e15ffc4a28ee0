"""PatchCore: a memory bank of locally aware patch features, scored by nearest neighbour.

docs/method.md section 6: levels 2 to 4 (the last 3), each token's 3 x 3 neighbourhood
average-pooled to
1024 per level and the levels pooled again to 1024; the bank is every training token reduced
to 10 % by greedy k-centre selection in a random 128-d projection (10 random start points);
a token's score is the squared L2 distance to its nearest bank vector, the image score the
largest token score, and the map is the token scores bilinearly upsampled (align_corners
False) and smoothed with a Gaussian of sigma 4.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from adjax.methods.base import MethodFacts
from adjax.methods import common, knn


@dataclasses.dataclass(frozen=True)
class PatchCore(MethodFacts):
  """Settings of PatchCore (defaults: docs/method.md section 6).

  Attributes:
    coreset_ratio: share of training tokens kept in the bank (1.0: no coreset).
    projection_dim: dimension of the random projection for the coreset.
    num_starts: random start points of the greedy selection.
    embed_dim: per-level dimension after pooling the 3 x 3 neighbourhood.
    target_dim: final feature dimension.
    num_levels: use the last this many levels (3 = levels 2-4 of a 4-level backbone).
    k: nearest neighbours averaged into a token score.
    sigma: Gaussian smoothing of the map, pixels.
    embed_batch: images embedded per block.
    query_block: test tokens per nearest-neighbour block.
    bank_block: bank rows per nearest-neighbour block.
    coreset_block: points per block of the coreset's start distances.
  """
  checkpoint = "angle"        # the PatchCore-selected pretraining checkpoint
  coreset_ratio: float = 0.1
  projection_dim: int = 128
  num_starts: int = 10
  embed_dim: int = 1024
  target_dim: int = 1024
  num_levels: int | None = 3
  k: int = 1
  sigma: float = 4.0
  embed_batch: int = 32
  query_block: int = 2048
  bank_block: int = 16384
  coreset_block: int = 65536

  name = "patchcore"

  def embed(self, levels: Any) -> jax.Array:
    """Locally aware patch features: list of (N, h_k, w_k, C_k) -> (N, h, w, target_dim)."""
    levels = common.last_levels(common.check_levels(levels, "levels"), self.num_levels)
    return _embed(self, tuple(levels))

  def fit(self, train_levels: Any, rng: jax.Array) -> dict:
    """Builds the memory bank.

    Args:
      train_levels: list of (N, h_k, w_k, C_k) normal training features.
      rng: PRNG key (coreset projection and start points).

    Returns:
      {"bank": (B, target_dim)}.
    """
    if not 0.0 < self.coreset_ratio <= 1.0:
      raise ValueError(f"patchcore: coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
    feats = self.embed(train_levels)
    feats = feats.reshape(-1, feats.shape[-1])
    if self.coreset_ratio >= 1.0:
      return {"bank": feats}
    num = max(1, int(feats.shape[0] * self.coreset_ratio))
    idx = knn.greedy_coreset(feats, num, rng, projection_dim=self.projection_dim,
                             num_starts=self.num_starts, block_size=self.coreset_block)
    return {"bank": feats[idx]}

  def score(self, state: dict, test_levels: Any, image_size: Any):
    """Scores test images against the bank.

    Args:
      state: from `fit`.
      test_levels: list of (M, h_k, w_k, C_k).
      image_size: int or (H, W).

    Returns:
      (image_scores (M,), maps (M, H, W)) float32: the image score is the largest token
      score (before upsampling, as the reference takes it).
    """
    levels = common.last_levels(common.check_levels(test_levels, "test_levels"),
                                self.num_levels)
    feats = _embed(self, tuple(levels))
    m, h, w, d = feats.shape
    dist, _ = knn.nearest_neighbours(feats.reshape(-1, d), state["bank"], k=self.k,
                                     query_block=self.query_block, bank_block=self.bank_block)
    return _finish(self, dist.mean(axis=1).reshape(m, h, w), common.image_hw(image_size))


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(cfg: PatchCore, levels: tuple) -> jax.Array:
  n = levels[0].shape[0]
  per_image = lambda xs: common.aggregate_levels([x[None] for x in xs], cfg.embed_dim,
                                                 cfg.target_dim)[0]
  # lax.map in blocks bounds the (block, h, w, 9C) neighbourhood tensors.
  return jax.lax.map(per_image, levels, batch_size=min(cfg.embed_batch, n))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _finish(cfg: PatchCore, tokens: jax.Array, hw: tuple[int, int]):
  m = tokens.shape[0]
  maps = common.token_maps_to_image([tokens], hw, align_corners=False, sigma=cfg.sigma)
  return tokens.reshape(m, -1).max(axis=1), maps
