"""Norm-oriented contrastive loss (docs/method.md section 4).

A_i = sqrt(||e_i|| + 1) - 1 is a token's anomaly score. Normal tokens are pulled into the band
[r_min, r_max] and anomalous tokens pushed beyond r_max + 0.75, each term a softplus weighted by
an exponential of its margin. The radius and the weights are constants (no gradient), as in the
reference. Every mean is over the tokens that meet its condition, written with labels as weights
(no boolean indexing), and is 0 when none do.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

RADIUS_CAP = 0.4
RADIUS_SHRINK = 0.9
BAND = 0.99
ANOMALY_MARGIN = 0.75


def anomaly_score(features: Array) -> Array:
  """A = sqrt(||e|| + 1) - 1 over the last axis, in float32 (the FeatureNorm score)."""
  features = jnp.asarray(features, jnp.float32)
  squared = jnp.sum(features * features, axis=-1)
  # Gradient of ||e|| at e = 0 is taken as 0 (as torch's norm does), not NaN.
  safe = jnp.where(squared > 0, squared, 1.0)
  norm = jnp.where(squared > 0, jnp.sqrt(safe), 0.0)
  return jnp.sqrt(norm + 1.0) - 1.0


def _masked_mean(values: Array, mask: Array) -> Array:
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def norm_loss(features: Array, labels: Array, *, weights: Optional[Array] = None) -> Array:
  """Norm-oriented contrastive loss of one level.

  Args:
    features: (N, D) projected features of one view.
    labels: (N,) in {0, 1}, 1 = anomalous.
    weights: optional (N,) in {0, 1}: 0 drops a token (padding).

  Returns:
    Scalar float32 loss.
  """
  labels = jnp.asarray(labels, jnp.float32)
  features = jnp.asarray(features, jnp.float32)
  if features.ndim != 2 or labels.shape != features.shape[:1]:
    raise ValueError(f"norm_loss expects features (N, D) and labels (N,), got {features.shape}"
                     f" and {labels.shape}")
  keep = jnp.ones_like(labels) if weights is None else jnp.asarray(weights, jnp.float32)
  anomalous = labels * keep
  normal = (1.0 - labels) * keep
  score = anomaly_score(features)
  fixed = jax.lax.stop_gradient(score)
  min_anomalous = jnp.min(jnp.where(anomalous > 0, fixed, jnp.inf))
  r_max = jnp.where(jnp.sum(anomalous) > 0,
                    jnp.minimum(RADIUS_SHRINK * min_anomalous, RADIUS_CAP), RADIUS_CAP)
  r_min = BAND * r_max
  boundary = r_max + ANOMALY_MARGIN
  above = normal * (fixed > r_max)
  below = normal * (fixed < r_min)
  inside = anomalous * (fixed < boundary)
  # Weights exp(margin) are constants; masked-out entries can be huge, so zero them first.
  weight = lambda margin, mask: jnp.exp(jnp.where(mask > 0, margin, 0.0))
  term_above = jax.nn.softplus(score - r_max) * weight(fixed - r_max, above)
  term_below = jax.nn.softplus(r_min - score) * weight(r_min - fixed, below)
  term_inside = jax.nn.softplus(boundary - score) * weight(boundary - fixed, inside)
  return (_masked_mean(term_above, above) + _masked_mean(term_below, below)
          + _masked_mean(term_inside, inside))
