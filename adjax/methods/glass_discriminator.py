"""GLASS's discriminator, its focal and BCE losses, and the synthesis of its Gaussian anomalies
by gradient ascent into a shell around the normal centre (see adjax/methods/glass.py; `cfg`
is a `Glass` settings object)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from adjax.methods import common

# The Gaussian anomalies are moved into their shell after every this many ascent steps.
_PROJECT_EVERY = 5


def discriminator_logits(p: dict, stats: dict, f: jax.Array, train: bool):
  """Logit of D(f) per row of f (T, D); returns (logits (T,), (batch mean, unbiased var)).

  In training, BatchNorm normalises with the batch's biased variance and reports the unbiased
  one for the running statistics, as torch's BatchNorm1d.
  """
  h = common.dense(p["fc"], f)
  if train:
    mean, var = h.mean(0), h.var(0)
  else:
    mean, var = stats["mean"], stats["var"]
  h = (h - mean) / jnp.sqrt(var + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
  h = jax.nn.leaky_relu(h, 0.2)
  n = f.shape[0]
  return common.dense(p["out"], h)[:, 0], (mean, var * n / max(n - 1, 1))


def discriminator(p: dict, stats: dict, f: jax.Array, train: bool):
  """D(f) in (0, 1) per row of f (T, D); returns (scores (T,), batch statistics)."""
  logits, batch_stats = discriminator_logits(p, stats, f, train)
  return jax.nn.sigmoid(logits), batch_stats


def _update_stats(stats: dict, batch_stats) -> dict:
  """BatchNorm running statistics after one training pass (momentum 0.1, as torch)."""
  mean, var = batch_stats
  return {"mean": 0.9 * stats["mean"] + 0.1 * mean, "var": 0.9 * stats["var"] + 0.1 * var}


def _bce(logits: jax.Array, target: float) -> jax.Array:
  """torch's BCELoss of sigmoid(logits) against a constant target, from the logits."""
  return -jnp.mean(target * jax.nn.log_sigmoid(logits)
                   + (1 - target) * jax.nn.log_sigmoid(-logits))


def _focal_terms(cfg: Any, logits: jax.Array, y: jax.Array):
  """Per-token focal loss and squared error (D - y)^2 for binary targets y (T,).

  The reference's FocalLoss on [1 - D, D]: the one-hot target is clamped to
  [smooth, 1 - smooth], pt = target . [1 - D, D] + smooth, loss -(1 - pt)^gamma log pt.
  """
  p = jax.nn.sigmoid(logits)
  s = cfg.focal_smooth
  weight = jnp.where(y > 0.5, 1.0 - s, s)  # the smoothed target's weight on D
  pt = weight * p + (1.0 - weight) * (1.0 - p) + s
  # pt <= 1 exactly; the clamp keeps a rounding excess from meeting a fractional gamma.
  return -jnp.maximum(1.0 - pt, 0.0) ** cfg.focal_gamma * jnp.log(pt), (p - y) ** 2


def _mined_focal(cfg: Any, logits: jax.Array, y: jax.Array) -> jax.Array:
  """Mean focal loss over the hard texture tokens: squared error >= its mining quantile."""
  loss, err = _focal_terms(cfg, logits, y)
  if cfg.mining_quantile <= 0:
    return loss.mean()
  keep = jax.lax.stop_gradient(err >= jnp.quantile(err, cfg.mining_quantile))
  keep = keep.astype(loss.dtype)
  return jnp.sum(keep * loss) / jnp.sum(keep)


def _masked_quantile(values: jax.Array, valid: jax.Array, q: float) -> jax.Array:
  """torch.quantile (linear interpolation) of values[valid], with a static shape."""
  s = jnp.sort(jnp.where(valid, values, jnp.inf))
  m = jnp.sum(valid)
  pos = q * (m - 1).astype(values.dtype)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, m - 1)
  return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _to_shell(f: jax.Array, c: jax.Array, lo, hi) -> jax.Array:
  """Moves each row of f along its ray from c so that lo <= |f - c| <= hi."""
  v = f - c
  norm = jnp.linalg.norm(v, axis=1, keepdims=True)
  return c + v * (jnp.clip(norm, lo, hi) / (norm + 1e-10))


def _synthesize(cfg: Any, dsc: dict, stats: dict, true: jax.Array, fake: jax.Array,
                mask: jax.Array, centre: jax.Array, key: jax.Array):
  """The step's anomalies from projected tokens (T, D).

  Args:
    cfg: settings.
    dsc: discriminator parameters (the ascent's gradients do not reach them).
    stats: BatchNorm running statistics before the step.
    true: projected normal tokens.
    fake: projected texture-augmented tokens.
    mask: (T,) bool, the augmented tokens inside the texture mask.
    centre: (T, D) each token's per-position normal centre.
    key: PRNG key of the Gaussian noise.

  Returns:
    (gaussian anomalies (T, D), texture tokens with the masked ones in their shell (T, D),
    radius r, running statistics after the ascent's discriminator passes).
  """
  # The radius from the normal tokens: true ones and the augmented ones outside the mask.
  dist = jnp.linalg.norm(jnp.concatenate([fake, true]) - jnp.concatenate([centre, centre]),
                         axis=1)
  valid = jnp.concatenate([~mask, jnp.ones(true.shape[0], bool)])
  r = jax.lax.stop_gradient(_masked_quantile(dist, valid, cfg.radius_quantile))

  t = true.shape[0]
  dsc_c, true_c = jax.lax.stop_gradient(dsc), jax.lax.stop_gradient(true)

  def gaus_loss(g):
    # D sees true and Gaussian tokens in one batch (one BatchNorm), as in the reference.
    logits, batch_stats = discriminator_logits(dsc_c, None, jnp.concatenate([true_c, g]), True)
    return _bce(logits[t:], 1.0), batch_stats

  def body(s, carry):
    g, stats = carry
    grad, batch_stats = jax.grad(gaus_loss, has_aux=True)(jax.lax.stop_gradient(g))
    stats = _update_stats(stats, batch_stats)
    # The ascent step is a constant shift: gradients of the loss reach `true` through g itself.
    g = g + cfg.ascent_lr * grad / (jnp.linalg.norm(grad, axis=1, keepdims=True) + 1e-10)
    g = jax.lax.cond((s + 1) % _PROJECT_EVERY == 0,
                     lambda g: _to_shell(g, centre, r, cfg.annulus_factor * r),
                     lambda g: g, g)
    return g, stats

  gaus = true + cfg.noise_std * jax.random.normal(key, true.shape)
  gaus, stats = jax.lax.fori_loop(0, cfg.ascent_steps, body, (gaus, stats))
  a, b = cfg.texture_annulus
  fake = jnp.where(mask[:, None], _to_shell(fake, centre, a * r, b * r), fake)
  return gaus, fake, r, stats
