"""GLASS: a patch discriminator trained against synthesized anomalies (docs/method.md section 6).

This follows the reference (ADPretrain's ad_models/glass, itself GLASS's public code) in its
"hypersphere" mode (distribution=3, which the reference's evaluation selects for every class).

Features: PatchCore's locally aware aggregation (3 x 3 neighbourhood, adaptive pooling) of the
last 2 levels to 1536 dimensions, then, with `projection=True`, a trainable linear
pre-projection (for original features; the reference uses none, and a smaller noise, for
residual / pretrained features: `projection=False, noise_std=0.005`). A discriminator
Linear(1536, 1024) - BatchNorm - LeakyReLU(0.2) - Linear(1024, 1, no bias) - sigmoid gives each
token the probability of being anomalous; linear weights are Xavier-normal, biases torch's
default.

At the start of each epoch the normal centre c is computed per grid position: the mean
projected feature of the whole training set at that position, (h w, D). Each step takes a
batch of normal images and their texture-augmented versions (Perlin mask m on the token grid)
and makes three kinds of tokens:
  * true: the projected normal features (target 0);
  * texture anomalies: the projected augmented features (target m). The radius r is the
    `radius_quantile` quantile of the distances to c of the true tokens together with the
    augmented tokens outside the mask; augmented tokens inside the mask are moved radially into
    the shell 2 r <= |f - c| <= 4 r (`texture_annulus`);
  * Gaussian anomalies: true + N(0, noise_std^2), moved `ascent_steps` times by normalised
    gradient ascent (step `ascent_lr`) on their BCE(D, 1) loss (the discriminator seeing true
    and Gaussian tokens in one batch, so in one BatchNorm), and after every 5th step moved
    radially into the shell r <= |g - c| <= 2 r (`annulus_factor`) (target 1). The ascent steps
    are constants, but the noise is added to, and the shell projections are functions of, the
    projected features, so gradients reach the projection through them as in the reference.
Loss = BCE(true, 0) + BCE(gaussian, 1) + focal(texture, m) (gamma 2, label smoothing 1e-5),
the focal term over the hardest half of the texture tokens only (those whose squared error
(D - m)^2 is at least its `mining_quantile` quantile). Optimisers: AdamW (lr 2e-4, weight decay
0.01) for the discriminator; Adam with an L2 term (lr 1e-4, weight decay 1e-5) for the
projection. An epoch is a fresh permutation of the training images, capped, as the
reference's `limit=392`, at the first step whose running image count exceeds `limit` (50 steps
of 8). BatchNorm running statistics (momentum 0.1, unbiased variance) are updated at every
discriminator pass in training, as torch does: per step, the `ascent_steps` ascent passes,
the final true + Gaussian pass and the texture pass. Score: the discriminator's output per
token (running statistics); the image score is the largest token score; the map is upsampled
bilinearly (align corners False) and smoothed with a Gaussian of sigma 4.

Deliberate differences from the reference:
  * Texture anomalies. The reference makes them in image space: a DTD texture (randomly
    augmented) blended into the image, weight beta ~ N(0.5, 0.1) clipped to [0.2, 0.8], under
    a mask made at image resolution (one or two rotated Perlin masks, united or intersected,
    times a foreground mask on MVTec AD and VisA) and max-pooled to the token grid, then the
    backbone. The methods here see features only, so `fit` takes them as optional
    `synthetic_levels` (features of such images) with `synthetic_masks` (N_s, h, w) on the
    first used level's grid (`token_grid`), binarised at 0.5: `adjax evaluate` makes them with
    data_pipelines/texture_anomalies.py from a texture folder (the input setting `textures`,
    eval.method_settings.glass.textures), `texture_rounds` R copies of each training image.
    When N_s is a multiple R of
    the N training images (copy r of image i at r * N + i, as `adjax evaluate` lays them out),
    a step's texture batch is the copies of its own true batch, as in the reference (whose
    loader returns each image with its textured version), and epoch e uses copy e mod R: a new
    copy per epoch for R epochs. With `synthetic_refresh` (the input setting
    `texture_refresh`) a new set of R copies follows every R epochs, so every epoch sees new
    textures, as the reference's, which draws anew in every epoch; without it the R copies
    repeat.
    Otherwise each step draws its texture batch at random. Without them `fit` makes a
    feature-space surrogate:
    under a Perlin mask drawn on the token grid (common.perlin_mask), a token becomes
    beta * itself + (1 - beta) * texture, beta drawn as the reference's; the texture is the
    tokens of another training image at shuffled positions plus Gaussian noise of the
    features' per-channel scale (`texture_noise`). The annulus move, the radius and the
    mining above apply to either kind.
  * Batches are full (static shapes): each epoch uses floor(N / batch) batches of a
    permutation (the reference's last, smaller batch is dropped), and the centre is the exact
    mean over the training images (the reference averages batch means).
  * The reference evaluates on the test set after every epoch and reports each metric's best
    value over the 640 epochs; `fit` returns the final state.
  * Only the hypersphere mode is implemented (not the "manifold" mode, svd=0, whose annulus is
    around each true feature with fixed radii).
  * BCE is computed from the logit (log-sigmoid), where torch clamps log(p) at -100: the same
    except for |logit| > 100.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adjax.methods.base import MethodFacts
from adjax.methods import common
from adjax.methods.glass_discriminator import (_bce, _mined_focal, _synthesize, _update_stats,
                                               discriminator, discriminator_logits)

# The reference's texture blending weight: beta ~ N(0.5, 0.1), clipped to [0.2, 0.8].
_BETA_MEAN, _BETA_STD, _BETA_RANGE = 0.5, 0.1, (0.2, 0.8)


@dataclasses.dataclass(frozen=True)
class Glass(MethodFacts):
  """Settings of GLASS (defaults: the reference for original features).

  Attributes:
    num_levels: use the last this many levels.
    embed_dim, target_dim: aggregation dimensions.
    hidden: discriminator width.
    projection: train a linear pre-projection of the features (reference: yes for original
      features, no for residual / pretrained ones).
    lr, proj_weight_decay: Adam learning rate and L2 weight decay of the projection.
    dsc_lr, dsc_weight_decay: AdamW learning rate and decoupled weight decay of the
      discriminator.
    noise_std: std of the Gaussian anomalies (reference: 0.015 for original features, 0.005
      for residual / pretrained ones).
    ascent_steps, ascent_lr: gradient ascent on the Gaussian anomalies.
    radius_quantile: r is this quantile of the normal tokens' distances to the centre.
    annulus_factor: the Gaussian anomalies' shell is [r, annulus_factor * r].
    texture_annulus: the masked texture anomalies' shell is [a * r, b * r] for (a, b).
    mining_quantile: the focal loss keeps the texture tokens whose squared error is at least
      this quantile (0: all tokens).
    focal_gamma, focal_smooth: focusing parameter and label smoothing of the focal loss.
    texture_noise: std of the surrogate texture's noise, relative to the feature std.
    epochs, batch_size: passes over the training images, images per step.
    limit: an epoch ends after the first step at which more than `limit` images have been
      seen (None: no cap).
    test_every: epochs between the states `fit_in_rounds` yields by default (the reference
      tests after every epoch).
    score_batch: images per block when scoring.
    sigma: Gaussian smoothing of the map, pixels.
  """
  # The reference runs GLASS on residual features with no adapter and a smaller noise
  # ("residual features don't need adapter and need smaller noise").
  residual_settings = {"projection": False, "noise_std": 0.005}
  synthetic_inputs = "textures"
  # eval.method_settings.glass.<name>: how the evaluation makes the texture anomalies.
  #   textures: a folder of texture photographs (e.g. DTD's dtd/images): the anomalies are made
  #     in image space, as the reference makes them; "" = the feature-space stand-in.
  #   texture_rounds: texture-augmented copies of each training image.
  #   texture_refresh: new copies every texture_rounds epochs, so every epoch sees new textures
  #     (the reference's way; a backbone pass over the training set per epoch and kind).
  #   foreground: GLASS's foreground masks (<class>/<image name>): the textures only on the
  #     object; "" = anywhere.
  input_settings = {"textures": "", "texture_rounds": 4, "texture_refresh": False,
                    "foreground": ""}
  num_levels: int | None = 2
  embed_dim: int = 1536
  target_dim: int = 1536
  hidden: int = 1024
  projection: bool = True
  lr: float = 1e-4
  proj_weight_decay: float = 1e-5
  dsc_lr: float = 2e-4
  dsc_weight_decay: float = 0.01
  noise_std: float = 0.015
  ascent_steps: int = 20
  ascent_lr: float = 1e-3
  radius_quantile: float = 0.75
  annulus_factor: float = 2.0
  texture_annulus: tuple[float, float] = (2.0, 4.0)
  mining_quantile: float = 0.5
  focal_gamma: float = 2.0
  focal_smooth: float = 1e-5
  texture_noise: float = 1.0
  epochs: int = 640
  batch_size: int = 8
  limit: int | None = 392
  test_every: int = 1
  score_batch: int = 32
  sigma: float = 4.0

  name = "glass"

  def embed(self, levels: Any, what: str = "levels") -> jax.Array:
    """Aggregated features (N, h, w, target_dim) of the last `num_levels` levels."""
    levels = common.last_levels(common.check_levels(levels, what), self.num_levels)
    return _embed(self, tuple(levels))

  def token_grid(self, levels: Any) -> tuple[int, int]:
    """The (h, w) token grid the discriminator works on (that of `synthetic_masks`): the grid
    of the first of the levels it uses."""
    return tuple(common.last_levels(list(levels), self.num_levels)[0].shape[1:3])

  def init(self, rng: jax.Array) -> dict:
    """Initial projection (if any) and discriminator parameters and BatchNorm statistics."""
    return _init(self, common.host_rng(rng))

  def epoch_steps(self, num_images: int) -> int:
    """Steps per epoch for `num_images` training images (full batches, capped by `limit`)."""
    bs = min(self.batch_size, num_images)
    steps = common.epoch_steps(num_images, bs)
    if self.limit is not None:
      steps = min(steps, self.limit // bs + 1)
    return steps

  def fit(self, train_levels: Any, rng: jax.Array, *, synthetic_levels: Any = None,
          synthetic_masks: Any = None,
          synthetic_refresh: Callable[[int], tuple[Any, Any]] | None = None) -> dict:
    """Trains the projection and the discriminator (see `fit_in_rounds` for the arguments)."""
    state = None
    for state in self.fit_in_rounds(train_levels, rng, every=self.epochs,
                                    synthetic_levels=synthetic_levels,
                                    synthetic_masks=synthetic_masks,
                                    synthetic_refresh=synthetic_refresh):
      pass
    return state

  def fit_in_rounds(self, train_levels: Any, rng: jax.Array, *, every: int | None = None,
                    synthetic_levels: Any = None, synthetic_masks: Any = None,
                    synthetic_refresh: Callable[[int], tuple[Any, Any]] | None = None
                    ) -> Iterator[dict]:
    """Trains the projection and the discriminator, yielding the state every `every` epochs
    (default `test_every`) and after the last; the last is `fit`'s result, whatever `every`.

    Args:
      train_levels: list of (N, h_k, w_k, C_k) normal training features (one class, or
        several concatenated).
      rng: PRNG key.
      synthetic_levels: optional features of texture-augmented images, list of
        (N_s, h_k, w_k, C_k); with N_s = R * N, copy r of training image i at r * N + i
        (paired with the true batch, see the module docstring).
      synthetic_masks: (N_s, h, w) token masks of those images (required with them).
      synthetic_refresh: optional, with N_s = R * N: a function of a set index s >= 1 that
        returns (levels, masks) of another R copies of every training image, shaped as
        `synthetic_levels` and `synthetic_masks`; epochs s R .. s R + R - 1 use set s (set 0
        is `synthetic_levels`), so no texture is seen twice, as in the reference, which draws
        a new one every epoch. It is called once per set, when training reaches it.

    Yields:
      {"params", "stats", "loss" (last step), "epochs" (done so far)}.
    """
    every = common.round_length("glass", self.epochs, every, self.test_every)
    x = self.embed(train_levels, "train_levels")
    if (synthetic_levels is None) != (synthetic_masks is None):
      raise ValueError("glass: pass synthetic_levels and synthetic_masks together")
    syn = masks = None
    if synthetic_levels is not None:
      syn, masks = self._synthetic(synthetic_levels, synthetic_masks, "synthetic_levels")
    set_epochs = None   # epochs per synthetic set, when sets are refreshed
    if synthetic_refresh is not None:
      if syn is None or syn.shape[0] % x.shape[0]:
        raise ValueError("glass: synthetic_refresh needs synthetic_levels with R copies of "
                         f"each of the {x.shape[0]} training images (got "
                         f"{None if syn is None else syn.shape[0]} images)")
      set_epochs = syn.shape[0] // x.shape[0]
    k_init, k_train = jax.random.split(rng)
    state = self.init(k_init)
    carry = (state["params"], _optimizer(self, state["params"]).init(state["params"]),
             state["stats"])
    # Training stops at every yield and, with refreshed sets, wherever a new set begins; the
    # pieces share one compiled program (traced epoch bounds, same shapes).
    stops = set(range(every, self.epochs, every)) | {self.epochs}
    if set_epochs is not None:
      stops |= set(range(set_epochs, self.epochs, set_epochs))
    start, current_set = 0, 0
    for end in sorted(stops):
      if set_epochs is not None and start // set_epochs != current_set:
        current_set = start // set_epochs
        fresh = self._synthetic(*synthetic_refresh(current_set),
                                f"synthetic_refresh({current_set})")
        if fresh[0].shape != syn.shape:
          raise ValueError(f"glass: synthetic_refresh({current_set}) gave features of shape "
                           f"{tuple(fresh[0].shape)} after aggregation; expected "
                           f"{tuple(syn.shape)}, as synthetic_levels")
        syn, masks = fresh
      carry, loss = _train(self, x, syn, masks, carry, k_train, start, end - start)
      if end % every == 0 or end == self.epochs:
        yield {"params": carry[0], "stats": carry[2], "loss": loss, "epochs": end}
      start = end

  def _synthetic(self, levels: Any, masks: Any, what: str) -> tuple[jax.Array, jax.Array]:
    """Aggregated texture-anomaly features and their binarised (N_s, h, w) token masks."""
    syn = self.embed(levels, what)
    masks = jnp.asarray(masks, jnp.float32)
    if masks.shape != syn.shape[:3]:
      raise ValueError(f"glass: the masks of {what} must be {tuple(syn.shape[:3])}, got "
                       f"{tuple(masks.shape)}")
    return syn, (masks > 0.5).astype(jnp.float32)

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


def _xavier_linear(gen, fan_in: int, fan_out: int, *, bias: bool = True) -> dict:
  """A dense layer as the reference's init_weight: Xavier-normal weight, torch default bias."""
  p = common.torch_linear_init(gen, fan_in, fan_out, bias=bias)
  std = math.sqrt(2.0 / (fan_in + fan_out))
  p["w"] = jnp.asarray(gen.normal(0.0, std, (fan_in, fan_out)), jnp.float32)
  return p


def _init(cfg: Glass, gen) -> dict:
  d = cfg.target_dim
  params = {}
  if cfg.projection:
    params["proj"] = _xavier_linear(gen, d, d)
  params["dsc"] = {"fc": _xavier_linear(gen, d, cfg.hidden),
                   "bn": {"scale": jnp.asarray(np.ones(cfg.hidden, np.float32)),
                          "bias": jnp.asarray(np.zeros(cfg.hidden, np.float32))},
                   "out": _xavier_linear(gen, cfg.hidden, 1, bias=False)}
  return {"params": params,
          "stats": {"mean": jnp.asarray(np.zeros(cfg.hidden, np.float32)),
                    "var": jnp.asarray(np.ones(cfg.hidden, np.float32))}}


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(cfg: Glass, levels: tuple) -> jax.Array:
  per_image = lambda xs: common.aggregate_levels([x[None] for x in xs], cfg.embed_dim,
                                                 cfg.target_dim)[0]
  return jax.lax.map(per_image, levels, batch_size=min(cfg.score_batch, levels[0].shape[0]))


def _project(cfg: Glass, params: dict, f: jax.Array) -> jax.Array:
  """The trainable pre-projection of features (..., D), or the features themselves."""
  return common.dense(params["proj"], f) if cfg.projection else f


def _centre(cfg: Glass, params: dict, x: jax.Array) -> jax.Array:
  """Per-position normal centre (h w, D): the mean projected feature of the images x.

  The projection is affine, so the mean of the projected features is the projection of the
  mean feature: one (h w, D) product instead of N.
  """
  n, h, w, d = x.shape
  return _project(cfg, params, x.mean(0).reshape(h * w, d))


def _loss(cfg: Glass, p: dict, stats: dict, batch: jax.Array, fake_in: jax.Array,
          fake_mask: jax.Array, centre: jax.Array, key: jax.Array):
  """One step's loss and the running statistics after its discriminator passes."""
  b, h, w, d = batch.shape
  true = _project(cfg, p, batch.reshape(-1, d))
  fake = _project(cfg, p, fake_in.reshape(-1, d))
  mask = fake_mask.reshape(-1) > 0.5
  c = jnp.tile(centre, (b, 1))  # tokens are image-major: token i sits at position i % (h w)
  gaus, fake, _, stats = _synthesize(cfg, p["dsc"], stats, true, fake, mask, c, key)
  t = true.shape[0]
  logits, batch_stats = discriminator_logits(p["dsc"], None, jnp.concatenate([true, gaus]),
                                             True)
  stats = _update_stats(stats, batch_stats)
  fake_logits, batch_stats = discriminator_logits(p["dsc"], None, fake, True)
  stats = _update_stats(stats, batch_stats)
  loss = (_bce(logits[:t], 0.0) + _bce(logits[t:], 1.0)
          + _mined_focal(cfg, fake_logits, mask.astype(jnp.float32)))
  return loss, stats


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
  beta = jnp.clip(_BETA_MEAN + _BETA_STD * jax.random.normal(k_beta, (b, 1, 1, 1)),
                  *_BETA_RANGE)
  m = masks[..., None]
  return batch * (1 - m) + m * (beta * batch + (1 - beta) * texture), masks


def _optimizer(cfg: Glass, params: dict) -> optax.GradientTransformation:
  """AdamW for the discriminator, Adam with an L2 term for the projection (as the reference).

  torch.optim.Adam's weight_decay adds wd * param to the gradient before the moments
  (add_decayed_weights ahead of adam); AdamW's decays the parameter itself (optax.adamw).
  """
  tx = {"dsc": optax.adamw(cfg.dsc_lr, weight_decay=cfg.dsc_weight_decay)}
  if "proj" in params:
    tx["proj"] = optax.chain(optax.add_decayed_weights(cfg.proj_weight_decay),
                             optax.adam(cfg.lr))
  labels = {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}
  return optax.multi_transform(tx, labels)


def texture_batch(rng: jax.Array, images: jax.Array, epoch: jax.Array, num_images: int,
                  num_synthetic: int) -> jax.Array:
  """Indices of a step's texture anomalies among `num_synthetic`: with R = num_synthetic /
  num_images copies of every training image (copy r of image i at r * N + i), the epoch's
  copy (epoch mod R) of each image of the true batch `images`; else a uniform draw."""
  if num_synthetic % num_images == 0:
    return (epoch % (num_synthetic // num_images)) * num_images + images
  return jax.random.randint(rng, images.shape, 0, num_synthetic)


@functools.partial(jax.jit, static_argnums=(0,))
def _train(cfg: Glass, x, syn, syn_masks, carry, rng, start, count: int):
  """Epochs start .. start + count - 1 from carry = (params, optimiser state, statistics);
  each epoch's draws depend on its index only, so any split into calls gives the same state."""
  n = x.shape[0]
  bs = min(cfg.batch_size, n)
  per_epoch = cfg.epoch_steps(n)
  opt = _optimizer(cfg, carry[0])
  k_perm, k_step = jax.random.split(rng)

  def epoch(carry, e):
    p, opt_state, stats = carry
    # The centre is fixed for the epoch, from the projection as it stands at its start.
    centre = jax.lax.stop_gradient(_centre(cfg, p, x))
    perm = jax.random.permutation(jax.random.fold_in(k_perm, e), n)

    def step(carry, j):
      p, opt_state, stats = carry
      idx = jax.lax.dynamic_slice(perm, (j * bs,), (bs,))
      batch = x[idx]
      key = jax.random.fold_in(k_step, e * per_epoch + j)
      k_fake, k_syn, k_noise = jax.random.split(key, 3)
      if syn is None:
        fake_in, fake_mask = _surrogate_textures(cfg, k_fake, batch, x)
      else:
        sidx = texture_batch(k_syn, idx, e, n, syn.shape[0])
        fake_in, fake_mask = syn[sidx], syn_masks[sidx]
      (loss, stats), grads = jax.value_and_grad(_loss, argnums=1, has_aux=True)(
          cfg, p, stats, batch, fake_in, fake_mask, centre, k_noise)
      updates, opt_state = opt.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state, stats), loss

    carry, losses = jax.lax.scan(step, (p, opt_state, stats), jnp.arange(per_epoch))
    return carry, losses[-1]

  # A loop with traced bounds: one program serves every round length.
  return jax.lax.fori_loop(start, start + count, lambda i, c: epoch(c[0], i),
                           (carry, jnp.zeros((), jnp.float32)))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _score(cfg: Glass, params: dict, stats: dict, x: jax.Array, hw: tuple[int, int]):
  m, h, w, d = x.shape

  def one(f):
    proj = _project(cfg, params, f.reshape(-1, d))
    return discriminator(params["dsc"], stats, proj, False)[0].reshape(h, w)

  tokens = jax.lax.map(one, x, batch_size=min(cfg.score_batch, m))
  maps = common.token_maps_to_image([tokens], hw, align_corners=False, sigma=cfg.sigma)
  return tokens.reshape(m, -1).max(axis=1), maps
