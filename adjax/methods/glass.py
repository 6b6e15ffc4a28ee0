"""GLASS: a patch discriminator trained against synthesized anomalies (SPEC section 6).

Features: PatchCore's locally aware aggregation (3 x 3 neighbourhood, adaptive pooling) of the
last 2 levels to 1536 dimensions, then a trainable linear pre-projection. A discriminator
Linear(1536, 1024) - BatchNorm - LeakyReLU(0.2) - Linear(1024, 1) - sigmoid gives each token the
probability of being anomalous. Each training step uses three kinds of tokens:
  * true: the projected normal features (target 0);
  * Gaussian anomalies: true + N(0, noise_std^2), moved `ascent_steps` times by normalised
    gradient ascent (step `ascent_lr`) on their loss BCE(D, 1) (towards the normal data, making
    them hard), and every 5 steps projected into the annulus r <= |g - c| <= 4 r around the
    normal centre c (the batch's mean true feature; r its `radius_quantile` distance quantile)
    (target 1);
  * texture anomalies: Perlin-masked mixtures (target: the mask), scored with a focal loss.
Loss = BCE(true, 0) + BCE(gaussian, 1) + focal(texture, mask); Adam, lr 1e-4 for the projection
and 2e-4 for the discriminator. Score: the discriminator's output per token; the image score is
the largest token score; the map is upsampled bilinearly (align corners False) and smoothed
with a Gaussian of sigma 4.

Texture anomalies. GLASS makes them in image space (DTD textures blended into the image under
a Perlin mask, then the backbone). The methods here see features only, so `fit` takes them
as optional `synthetic_levels` (features of such images, any count) with `synthetic_masks`
(N_s, h, w) on the first used level's grid. Without them it makes a feature-space surrogate:
under a Perlin mask on the token grid, a token becomes beta * itself + (1 - beta) * "texture",
the texture being the tokens of another training image at shuffled positions plus Gaussian
noise of the features' per-channel scale, beta ~ U(0.2, 0.8).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adjax.methods import common


@dataclasses.dataclass(frozen=True)
class Glass:
  """Settings of GLASS (defaults: the GLASS paper's MVTec configuration).

  Attributes:
    num_levels: use the last this many levels.
    embed_dim, target_dim: aggregation dimensions.
    hidden: discriminator width.
    lr, dsc_lr: Adam learning rates of the projection and of the discriminator.
    noise_std: std of the Gaussian anomalies.
    ascent_steps, ascent_lr: gradient ascent on the Gaussian anomalies.
    radius_quantile: the annulus's inner radius is this quantile of normal distances.
    annulus_factor: outer radius = annulus_factor * inner radius.
    focal_gamma: focusing parameter of the focal loss.
    texture_noise: std of the surrogate texture's noise, relative to the feature std.
    epochs, batch_size: passes over the training images, images per step.
    score_batch: images per block when scoring.
    sigma: Gaussian smoothing of the map, pixels.
  """
  num_levels: int | None = 2
  embed_dim: int = 1536
  target_dim: int = 1536
  hidden: int = 1024
  lr: float = 1e-4
  dsc_lr: float = 2e-4
  noise_std: float = 0.015
  ascent_steps: int = 20
  ascent_lr: float = 1e-3
  radius_quantile: float = 0.75
  annulus_factor: float = 4.0
  focal_gamma: float = 2.0
  texture_noise: float = 1.0
  epochs: int = 640
  batch_size: int = 8
  score_batch: int = 32
  sigma: float = 4.0

  name = "glass"

  def embed(self, levels: Any, what: str = "levels") -> jax.Array:
    """Aggregated features (N, h, w, target_dim) of the last `num_levels` levels."""
    levels = common.last_levels(common.check_levels(levels, what), self.num_levels)
    return _embed(self, tuple(levels))

  def init(self, rng: jax.Array) -> dict:
    """Initial projection and discriminator parameters and BatchNorm statistics."""
    return _init(self, common.host_rng(rng))

  def fit(self, train_levels: Any, rng: jax.Array, *, synthetic_levels: Any = None,
          synthetic_masks: Any = None) -> dict:
    """Trains the projection and the discriminator.

    Args:
      train_levels: list of (N, h_k, w_k, C_k) normal training features (one class, or
        several concatenated).
      rng: PRNG key.
      synthetic_levels: optional features of texture-augmented images, list of
        (N_s, h_k, w_k, C_k).
      synthetic_masks: (N_s, h, w) token masks of those images (required with them).

    Returns:
      {"params", "stats", "loss" (last step)}.
    """
    x = self.embed(train_levels, "train_levels")
    if (synthetic_levels is None) != (synthetic_masks is None):
      raise ValueError("glass: pass synthetic_levels and synthetic_masks together")
    if synthetic_levels is not None:
      syn = self.embed(synthetic_levels, "synthetic_levels")
      masks = jnp.asarray(synthetic_masks, jnp.float32)
      if masks.shape != syn.shape[:3]:
        raise ValueError(f"glass: synthetic_masks must be {tuple(syn.shape[:3])}, got "
                         f"{tuple(masks.shape)}")
    else:
      syn = masks = None
    k_init, k_train = jax.random.split(rng)
    state = self.init(k_init)
    steps = self.epochs * common.epoch_steps(x.shape[0], self.batch_size)
    params, stats, loss = _train(self, x, syn, masks, state["params"], state["stats"],
                                 k_train, steps)
    return {"params": params, "stats": stats, "loss": loss}

  def score(self, state: dict, test_levels: Any, image_size: Any):
    """Scores test images.

    Args:
      state: from `fit`.
      test_levels: list of (M, h_k, w_k, C_k).
      image_size: int or (H, W).

    Returns:
      (image_scores (M,), maps (M, H, W)) float32.
    """
    x = self.embed(test_levels, "test_levels")
    return _score(self, state["params"], state["stats"], x, common.image_hw(image_size))


def _init(cfg: Glass, gen) -> dict:
  d = cfg.target_dim
  return {
      "params": {
          "proj": common.torch_linear_init(gen, d, d),
          "dsc": {"fc": common.torch_linear_init(gen, d, cfg.hidden),
                  "bn": {"scale": jnp.asarray(np.ones(cfg.hidden, np.float32)),
                         "bias": jnp.asarray(np.zeros(cfg.hidden, np.float32))},
                  "out": common.torch_linear_init(gen, cfg.hidden, 1, bias=False)},
      },
      "stats": {"mean": jnp.asarray(np.zeros(cfg.hidden, np.float32)),
                "var": jnp.asarray(np.ones(cfg.hidden, np.float32))},
  }


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(cfg: Glass, levels: tuple) -> jax.Array:
  per_image = lambda xs: common.aggregate_levels([x[None] for x in xs], cfg.embed_dim,
                                                 cfg.target_dim)[0]
  return jax.lax.map(per_image, levels, batch_size=min(cfg.score_batch, levels[0].shape[0]))


def discriminator(p: dict, stats: dict, f: jax.Array, train: bool):
  """D(f) in (0, 1) per row of f (T, D); returns (scores (T,), batch statistics)."""
  h = common.dense(p["fc"], f)
  if train:
    mean, var = h.mean(0), h.var(0)
  else:
    mean, var = stats["mean"], stats["var"]
  h = (h - mean) / jnp.sqrt(var + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
  h = jax.nn.leaky_relu(h, 0.2)
  n = f.shape[0]
  return jax.nn.sigmoid(common.dense(p["out"], h)[:, 0]), (mean, var * n / max(n - 1, 1))


def _bce(p: jax.Array, target: float) -> jax.Array:
  p = jnp.clip(p, 1e-7, 1 - 1e-7)
  return -jnp.mean(target * jnp.log(p) + (1 - target) * jnp.log(1 - p))


def _focal(p: jax.Array, y: jax.Array, gamma: float) -> jax.Array:
  pt = jnp.clip(jnp.where(y > 0.5, p, 1 - p), 1e-7, 1.0)
  return -jnp.mean((1 - pt) ** gamma * jnp.log(pt))


def _surrogate_textures(cfg: Glass, rng: jax.Array, batch: jax.Array, pool: jax.Array):
  """Perlin-masked feature-space anomalies: (B, h, w, D) features and (B, h, w) masks."""
  b, h, w, d = batch.shape
  k_mask, k_img, k_perm, k_noise, k_beta = jax.random.split(rng, 5)
  masks = jax.vmap(lambda k: common.perlin_mask(k, (h, w)))(jax.random.split(k_mask, b))
  other = pool[jax.random.randint(k_img, (b,), 0, pool.shape[0])].reshape(b, h * w, d)
  perm = jax.random.permutation(k_perm, h * w)
  scale = jnp.std(pool.reshape(-1, d), axis=0)
  texture = (other[:, perm].reshape(b, h, w, d)
             + cfg.texture_noise * scale * jax.random.normal(k_noise, (b, h, w, d)))
  beta = jax.random.uniform(k_beta, (b, 1, 1, 1), minval=0.2, maxval=0.8)
  m = masks[..., None]
  return batch * (1 - m) + m * (beta * batch + (1 - beta) * texture), masks


@functools.partial(jax.jit, static_argnums=(0, 7))
def _train(cfg: Glass, x, syn, syn_masks, params, stats, rng, steps):
  n, h, w, d = x.shape
  bs = min(cfg.batch_size, n)
  per_epoch = common.epoch_steps(n, bs)
  labels = {"proj": jax.tree.map(lambda _: "proj", params["proj"]),
            "dsc": jax.tree.map(lambda _: "dsc", params["dsc"])}
  opt = optax.multi_transform({"proj": optax.adam(cfg.lr), "dsc": optax.adam(cfg.dsc_lr)},
                              labels)

  def ascend(p, stats, true, gaus):
    centre = true.mean(0)
    dist = jnp.linalg.norm(true - centre, axis=1)
    r = jnp.quantile(dist, cfg.radius_quantile)
    gaus_loss = lambda g: _bce(discriminator(p["dsc"], stats, g, True)[0], 1.0)

    def body(s, g):
      grad = jax.grad(gaus_loss)(g)
      g = g + cfg.ascent_lr * grad / (jnp.linalg.norm(grad, axis=1, keepdims=True) + 1e-10)

      def project(g):
        v = g - centre
        norm = jnp.linalg.norm(v, axis=1, keepdims=True)
        target = jnp.clip(norm, r, cfg.annulus_factor * r)
        return centre + v * target / (norm + 1e-10)

      return jax.lax.cond((s + 1) % 5 == 0, project, lambda g: g, g)

    return jax.lax.fori_loop(0, cfg.ascent_steps, body, gaus)

  def loss_fn(p, stats, batch, fake_in, fake_mask, key):
    true = common.dense(p["proj"], batch.reshape(-1, d))
    fake = common.dense(p["proj"], fake_in.reshape(-1, d))
    noise = cfg.noise_std * jax.random.normal(key, true.shape)
    gaus0 = jax.lax.stop_gradient(true) + noise
    gaus = jax.lax.stop_gradient(ascend(jax.lax.stop_gradient(p), stats,
                                        jax.lax.stop_gradient(true), gaus0))
    both, (mean, var) = discriminator(p["dsc"], stats, jnp.concatenate([true, gaus]), True)
    t = true.shape[0]
    fake_scores, _ = discriminator(p["dsc"], stats, fake, True)
    loss = (_bce(both[:t], 0.0) + _bce(both[t:], 1.0)
            + _focal(fake_scores, fake_mask.reshape(-1), cfg.focal_gamma))
    return loss, (mean, var)

  def step(carry, i):
    p, opt_state, stats = carry
    epoch, j = i // per_epoch, i % per_epoch
    key = jax.random.fold_in(rng, i)
    perm = jax.random.permutation(jax.random.fold_in(rng, steps + epoch), n)
    idx = jax.lax.dynamic_slice(perm, (j * bs,), (bs,))
    batch = x[idx]
    k_fake, k_syn, k_noise = jax.random.split(key, 3)
    if syn is None:
      fake_in, fake_mask = _surrogate_textures(cfg, k_fake, batch, x)
    else:
      sidx = jax.random.randint(k_syn, (bs,), 0, syn.shape[0])
      fake_in, fake_mask = syn[sidx], syn_masks[sidx]
    (loss, (mean, var)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        p, stats, batch, fake_in, fake_mask, k_noise)
    updates, opt_state = opt.update(grads, opt_state, p)
    # BatchNorm running statistics, momentum 0.1 as torch.
    stats = {"mean": 0.9 * stats["mean"] + 0.1 * mean, "var": 0.9 * stats["var"] + 0.1 * var}
    return (optax.apply_updates(p, updates), opt_state, stats), loss

  (params, _, stats), losses = jax.lax.scan(step, (params, opt.init(params), stats),
                                            jnp.arange(steps))
  return params, stats, losses[-1]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _score(cfg: Glass, params: dict, stats: dict, x: jax.Array, hw: tuple[int, int]):
  m, h, w, d = x.shape

  def one(f):
    proj = common.dense(params["proj"], f.reshape(-1, d))
    return discriminator(params["dsc"], stats, proj, False)[0].reshape(h, w)

  tokens = jax.lax.map(one, x, batch_size=min(cfg.score_batch, m))
  maps = common.token_maps_to_image([tokens], hw, align_corners=False, sigma=cfg.sigma)
  return tokens.reshape(m, -1).max(axis=1), maps
