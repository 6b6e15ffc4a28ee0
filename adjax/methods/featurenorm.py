"""FeatureNorm: the norm of a (pretrained) feature is its anomaly score (docs/method.md section 6).

The norm-oriented loss of the pretraining pushes normal residual features towards a small
norm and anomalous ones beyond a margin, so no training is needed downstream: a token's score
is A = sqrt(|e| + 1) - 1, the same transform the loss uses.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from adjax.methods.base import MethodFacts
from adjax.methods import common


@dataclasses.dataclass(frozen=True)
class FeatureNorm(MethodFacts):
  """Settings of FeatureNorm.

  Attributes:
    sigma: Gaussian smoothing of the map in pixels (docs/method.md: 4).
    num_levels: use the last this many levels (None: all, as docs/method.md says).
    align_corners: bilinear upsampling mode (docs/method.md: align corners).
  """
  aligned_references = True   # the reference's FeatureNorm evaluation (val_norm.py) does
  sigma: float = 4.0
  num_levels: int | None = None
  align_corners: bool = True

  name = "featurenorm"

  def fit(self, train_levels: Any, rng: jax.Array | None = None) -> dict:
    """FeatureNorm has nothing to fit; the training features are only validated.

    Args:
      train_levels: list of (N, h_k, w_k, C_k) (may be None).
      rng: unused.

    Returns:
      An empty state dict.
    """
    del rng
    if train_levels is not None:
      common.check_levels(train_levels, "train_levels")
    return {}

  def score(self, state: dict, test_levels: Any, image_size: Any):
    """Scores test images.

    Args:
      state: from `fit` (empty).
      test_levels: list of (M, h_k, w_k, C_k).
      image_size: int or (H, W) of the output maps.

    Returns:
      (image_scores (M,), maps (M, H, W)), float32 jax arrays.
    """
    del state
    levels = common.last_levels(common.check_levels(test_levels, "test_levels"),
                                self.num_levels)
    return _score(self, tuple(levels), common.image_hw(image_size))


def token_scores(e: jax.Array) -> jax.Array:
  """A = sqrt(|e| + 1) - 1 per token: (N, h, w, C) -> (N, h, w)."""
  return jnp.sqrt(jnp.linalg.norm(e, axis=-1) + 1.0) - 1.0


@functools.partial(jax.jit, static_argnums=(0, 2))
def _score(cfg: FeatureNorm, levels: tuple, hw: tuple[int, int]):
  maps = common.token_maps_to_image([token_scores(x) for x in levels], hw,
                                    align_corners=cfg.align_corners, sigma=cfg.sigma)
  return maps.reshape(maps.shape[0], -1).max(axis=1), maps
