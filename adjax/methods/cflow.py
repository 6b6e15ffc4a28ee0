"""CFLOW-AD: conditional normalising flows on feature tokens (docs/method.md section 6).

One flow per level (the last 3): 8 FrEIA-style all-in-one coupling blocks, each
  x1, x2 = split(x)  (x1 has C - C//2 channels)
  a = 0.1 * subnet([x1, c]),  subnet = Linear(d, 2d) - ReLU - Linear(2d, 2 |x2|)
  x2 <- x2 * exp(1.9 tanh(a_s)) + a_t
  x <- W_perm (x * s_g + o_g),  s_g = 0.1 softplus_{beta=0.5}(g)  (1 at init)
with W_perm a fixed random orthogonal matrix, conditioned on CFLOW's 128-d 2-D sinusoidal
position code c. log p(x) = -C/2 log(2 pi) - |z|^2 / 2 + log|det J|; the loss is
-log sigmoid(log p / C). Adam, lr 2e-4 with linear warm-up and cosine decay.

Scoring follows the reference (ad_models/cflow/train_val.py): per level, log p / C of every
test token, minus its maximum over the whole test set, exponentiated, upsampled bilinearly
(align corners); the levels' maps are summed and turned into anomaly scores as
max(map) - map, the maximum again over the whole test set; the image score is the map's
maximum. That normalisation makes a test image's scores depend on the other test images passed
in the same call: pass a class's whole test set at once (the computation is blocked inside).

Training runs the reference's loop (train_meta_epoch there). An epoch (the reference's
sub-epoch) visits the training images in a new random order, in batches of `image_batch` (the
last incomplete one dropped). For each batch and level, the batch's B * h * w tokens (with their
positions) are permuted and cut into fibre batches of `fiber_batch` (the remainder dropped);
each fibre batch is one Adam step of that level's flow alone, so levels with more tokens take
more steps and each flow keeps its own Adam step count (torch's Adam over all flows skips the
parameters a step gave no gradient). The learning rate is set per image batch: constant within
a meta-epoch of `sub_epochs` epochs on a cosine over the meta-epochs, after a linear warm-up over
the first `warmup_meta_epochs`. The reference's schedule is 25 meta-epochs x 8 sub-epochs = 200
epochs of batches of 32 images and fibre batches of 4096 tokens. With fewer than 32 training
images the reference trains nothing (no full batch), and with fewer tokens than a fibre batch
it stops (an assertion); adjax then uses all images as one batch and all of a batch's tokens as
one fibre batch. A run of at most `warmup_meta_epochs` meta-epochs never leaves the warm-up (as
in the reference; a warning says so): shorten `sub_epochs` with `epochs`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adjax.methods.base import MethodFacts
from adjax.methods import common

_LOG_2PI_HALF = 0.5 * math.log(2.0 * math.pi)
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CFlow(MethodFacts):
  """Settings of CFLOW (defaults: docs/method.md section 6 and the reference).

  Attributes:
    num_levels: use the last this many levels.
    coupling_blocks: coupling blocks per flow.
    clamp: soft clamp of the log scale (alpha in FrEIA).
    cond_dim: position code dimension.
    lr: peak learning rate (Adam, torch's defaults).
    epochs: passes over the training images (the reference's sub-epochs).
    sub_epochs: epochs per meta-epoch, the unit of the learning-rate schedule.
    warmup_meta_epochs: meta-epochs of linear warm-up from lr / 10, per image batch, to the
      cosine's value at their end.
    final_lr_ratio: the cosine ends at lr * this (reached after the last meta-epoch).
    image_batch: images per batch (the reference's DataLoader: 32, last batch dropped).
    fiber_batch: tokens per Adam step and level (the reference's N = 4096).
    test_every: epochs between the states `fit_in_rounds` yields by default (the reference
      tests after every meta-epoch of 8 sub-epochs).
    score_block: tokens per block when scoring.
    sigma: Gaussian smoothing of the final map (the reference does none).
  """
  num_levels: int | None = 3
  coupling_blocks: int = 8
  clamp: float = 1.9
  cond_dim: int = 128
  lr: float = 2e-4
  epochs: int = 200
  sub_epochs: int = 8
  warmup_meta_epochs: int = 2
  final_lr_ratio: float = 1e-3
  image_batch: int = 32
  fiber_batch: int = 4096
  test_every: int = 8
  score_block: int = 8192
  sigma: float = 0.0

  name = "cflow"

  @property
  def meta_epochs(self) -> int:
    """Meta-epochs of `sub_epochs` epochs (the last may be shorter): the schedule's unit."""
    return math.ceil(self.epochs / self.sub_epochs)

  def batches_per_epoch(self, num_images: int) -> int:
    """Image batches per epoch (full batches only; one batch of all when fewer images)."""
    return common.epoch_steps(num_images, self.image_batch)

  def fibres_per_batch(self, num_images: int, tokens_per_image: int) -> int:
    """Adam steps per image batch for a level with `tokens_per_image` tokens per image."""
    tokens = min(self.image_batch, num_images) * tokens_per_image
    return max(1, tokens // self.fiber_batch)

  def learning_rates(self, batches_per_epoch: int) -> np.ndarray:
    """The learning rate of every image batch of the run, (epochs * batches_per_epoch,).

    As the reference's adjust_learning_rate and warmup_learning_rate: meta-epoch m of M gets
    eta + (lr - eta) (1 + cos(pi m / M)) / 2, eta = lr * final_lr_ratio; during the first
    warmup_meta_epochs W, batch g of the run gets lr / 10 + g / (W * sub_epochs * batches) *
    (cosine(W) - lr / 10) instead, cosine(W) being that cosine at m = W.
    """
    if self.sub_epochs < 1 or self.warmup_meta_epochs < 0:
      raise ValueError(f"cflow: sub_epochs must be >= 1 and warmup_meta_epochs >= 0, got "
                       f"{self.sub_epochs} and {self.warmup_meta_epochs}")
    eta = self.lr * self.final_lr_ratio
    cosine = lambda m: eta + (self.lr - eta) * (1.0 + np.cos(np.pi * m / self.meta_epochs)) / 2.0
    batch = np.arange(self.epochs * batches_per_epoch)
    meta = batch // (batches_per_epoch * self.sub_epochs)
    rates = cosine(meta)
    if self.warmup_meta_epochs:
      start = self.lr / 10.0
      share = batch / (self.warmup_meta_epochs * self.sub_epochs * batches_per_epoch)
      warm = start + share * (cosine(self.warmup_meta_epochs) - start)
      rates = np.where(meta < self.warmup_meta_epochs, warm, rates)
    return rates.astype(np.float32)

  def init(self, rng: jax.Array, dims: list[int]) -> dict:
    """Initial flows for levels with `dims` channels.

    Returns:
      {"params": [per level trainable dict], "perms": [per level (blocks, C, C)]}.
    """
    gen = common.host_rng(rng)
    params = [_init_flow(gen, int(c), self) for c in dims]
    perms = [_random_orthogonal(gen, self.coupling_blocks, int(c)) for c in dims]
    return {"params": params, "perms": perms}

  def fit(self, train_levels: Any, rng: jax.Array) -> dict:
    """Trains one flow per level (see `fit_in_rounds` for the arguments)."""
    state = None
    for state in self.fit_in_rounds(train_levels, rng, every=self.epochs):
      pass
    return state

  def fit_in_rounds(self, train_levels: Any, rng: jax.Array, *,
                    every: int | None = None) -> Iterator[dict]:
    """Trains one flow per level, yielding the state every `every` epochs (default
    `test_every`) and after the last; the last is `fit`'s result, whatever `every`.

    Args:
      train_levels: list of (N, h_k, w_k, C_k) normal training features.
      rng: PRNG key.
      every: epochs (passes over the training images) between yields.

    Yields:
      {"params", "perms", "loss" (last step), "epochs" (done so far)}.
    """
    every = common.round_length("cflow", self.epochs, every, self.test_every)
    levels = common.last_levels(common.check_levels(train_levels, "train_levels"),
                                self.num_levels)
    k_init, k_train = jax.random.split(rng)
    state = self.init(k_init, [x.shape[-1] for x in levels])
    per_epoch = self.batches_per_epoch(levels[0].shape[0])
    rates = jnp.asarray(self.learning_rates(per_epoch))
    if self.warmup_meta_epochs and self.meta_epochs <= self.warmup_meta_epochs:
      log.warning("cflow: %d epochs are at most %d meta-epochs of %d: the learning rate never "
                  "leaves its warm-up (as in the reference); lower sub_epochs for a short run",
                  self.epochs, self.warmup_meta_epochs, self.sub_epochs)
    params = state["params"]
    carry = (params, [_ADAM.init(p) for p in params])
    total = self.epochs * per_epoch
    for start in range(0, total, every * per_epoch):
      count = min(every * per_epoch, total - start)
      carry, loss = _train(self, tuple(levels), carry, state["perms"], rates, k_train, start,
                           count)
      yield {"params": carry[0], "perms": state["perms"], "loss": loss,
             "epochs": (start + count) // per_epoch}

  def log_likelihood(self, state: dict, levels: Any) -> list[jax.Array]:
    """log p / C of every token: list of (M, h_k, w_k) for the method's levels."""
    levels = common.last_levels(common.check_levels(levels, "levels"), self.num_levels)
    return list(_log_likelihood(self, tuple(levels), state["params"], state["perms"]))

  def score(self, state: dict, test_levels: Any, image_size: Any):
    """Scores a class's whole test set (see the module docstring on normalisation).

    Args:
      state: from `fit`.
      test_levels: list of (M, h_k, w_k, C_k).
      image_size: int or (H, W).

    Returns:
      (image_scores (M,) float64, maps (M, H, W) float32).
    """
    levels = common.last_levels(common.check_levels(test_levels, "test_levels"),
                                self.num_levels)
    log_likelihoods = _log_likelihood(self, tuple(levels), state["params"], state["perms"])
    return _maps_from_log_likelihood(log_likelihoods, common.image_hw(image_size), self.sigma,
                                     state.get("calibration"))

  def calibrated(self, state: dict, levels: Any, image_size: Any) -> dict:
    """The state with fixed normalisers: the maxima the scoring takes over the test set, taken
    once over `levels` (a detector's normal training images), so that an image's score no
    longer depends on the images scored with it (adjax/detector/ scores images one batch at
    a time)."""
    levels = common.last_levels(common.check_levels(levels, "levels"), self.num_levels)
    log_likelihoods = _log_likelihood(self, tuple(levels), state["params"], state["perms"])
    hw = common.image_hw(image_size)
    level_max = [float(np.asarray(lp, np.float64).max()) for lp in log_likelihoods]
    total = _summed_probabilities(log_likelihoods, hw, level_max)
    return {**state, "calibration": {"level_max": level_max, "map_max": float(total.max())}}


def _random_orthogonal(gen: np.random.Generator, num: int, c: int) -> jax.Array:
  """`num` fixed random orthogonal (C, C) matrices (Haar, via QR with sign correction)."""
  q, r = np.linalg.qr(gen.standard_normal((num, c, c)))
  q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  return jnp.asarray(q, jnp.float32)


def _init_flow(gen: np.random.Generator, c: int, cfg: CFlow) -> dict:
  len1, len2 = c - c // 2, c // 2
  d = len1 + cfg.cond_dim
  l1, l2 = [], []
  for _ in range(cfg.coupling_blocks):
    l1.append(common.torch_linear_init(gen, d, 2 * d))
    l2.append(common.torch_linear_init(gen, 2 * d, 2 * len2))
  stack = lambda ps, key: jnp.stack([p[key] for p in ps])
  g0 = 2.0 * math.log(math.exp(5.0) - 1.0)  # 0.1 * softplus_{0.5}(g0) = 1
  return {"w1": stack(l1, "w"), "b1": stack(l1, "b"), "w2": stack(l2, "w"),
          "b2": stack(l2, "b"),
          "scale": jnp.full((cfg.coupling_blocks, c), g0, jnp.float32),
          "offset": jnp.zeros((cfg.coupling_blocks, c), jnp.float32)}


def flow_forward(params: dict, perms: jax.Array, x: jax.Array, cond: jax.Array,
                 clamp: float) -> tuple[jax.Array, jax.Array]:
  """Runs a flow: x (B, C), cond (B, P) -> (z (B, C), log|det J| (B,))."""
  c = x.shape[-1]
  len1 = c - c // 2
  len2 = c // 2

  def block(carry, p):
    x, logdet = carry
    x1, x2 = x[:, :len1], x[:, len1:]
    h = jax.nn.relu(jnp.concatenate([x1, cond], -1) @ p["w1"] + p["b1"])
    a = 0.1 * (h @ p["w2"] + p["b2"])
    s = clamp * jnp.tanh(a[:, :len2])
    x2 = x2 * jnp.exp(s) + a[:, len2:]
    g = 0.1 * 2.0 * jax.nn.softplus(0.5 * p["scale"])
    x = (jnp.concatenate([x1, x2], -1) * g + p["offset"]) @ p["perm"].T
    return (x, logdet + s.sum(-1) + jnp.sum(jnp.log(g))), None

  (z, logdet), _ = jax.lax.scan(block, (x, jnp.zeros(x.shape[:1], x.dtype)),
                                dict(params, perm=perms))
  return z, logdet


def log_prob_per_dim(params, perms, x, cond, clamp):
  """log p(x) / C under a flow with a standard normal base."""
  c = x.shape[-1]
  z, logdet = flow_forward(params, perms, x, cond, clamp)
  return (-c * _LOG_2PI_HALF - 0.5 * jnp.sum(z * z, -1) + logdet) / c


def _positions(cfg: CFlow, x: jax.Array) -> jax.Array:
  """The position code of each of a level's h * w token positions, (h * w, cond_dim)."""
  _, h, w, _ = x.shape
  return jnp.asarray(common.sinusoidal_position_2d(cfg.cond_dim, h, w)).reshape(h * w, -1)


# torch.optim.Adam's defaults (betas 0.9, 0.999, eps 1e-8 outside the square root); the
# learning rate is applied per image batch in _train.
_ADAM = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)


def fibre_draws(cfg: CFlow, rng: jax.Array, batch: jax.Array, num_images: int,
                tokens_per_image: Sequence[int]) -> tuple[jax.Array, list[jax.Array]]:
  """The images and fibre batches of image batch `batch` of the run (a pure function of it).

  Returns:
    (images (B,): indices into the training set, from epoch batch // batches_per_epoch's
    permutation; per level (fibres, fibre size) indices into the batch's B * S_k tokens in
    image-major order, disjoint, from one permutation of them).
  """
  per_epoch = cfg.batches_per_epoch(num_images)
  size = min(cfg.image_batch, num_images)
  k_images, k_tokens = jax.random.split(rng)
  order = jax.random.permutation(jax.random.fold_in(k_images, batch // per_epoch), num_images)
  images = jax.lax.dynamic_slice(order, ((batch % per_epoch) * size,), (size,))
  fibres = []
  for k, s in enumerate(tokens_per_image):
    tokens = size * s
    count = cfg.fibres_per_batch(num_images, s)
    width = min(cfg.fiber_batch, tokens)
    perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(k_tokens, batch), k),
                                  tokens)
    fibres.append(perm[:count * width].reshape(count, width))
  return images, fibres


def fibre_loss(params: dict, perms: jax.Array, tokens: jax.Array, cond: jax.Array,
               clamp: float) -> jax.Array:
  """CFLOW's training loss of one fibre batch: mean of -log sigmoid(log p / C)."""
  return jnp.mean(-jax.nn.log_sigmoid(log_prob_per_dim(params, perms, tokens, cond, clamp)))


@functools.partial(jax.jit, static_argnums=(0,))
def _train(cfg: CFlow, levels: tuple, carry: tuple, perms: list, rates: jax.Array,
           rng: jax.Array, start, count: int):
  """Image batches start .. start + count - 1 of the run from carry = (per-level params,
  per-level Adam states); each batch's draws depend on its index only, so any split into calls
  gives the same flows."""
  n = levels[0].shape[0]
  positions = [_positions(cfg, x) for x in levels]
  sizes = [pos.shape[0] for pos in positions]

  def batch_step(carry, g):
    params, states = carry
    images, fibres = fibre_draws(cfg, rng, g, n, sizes)
    new_params, new_states, losses = [], [], []
    for x, pos, s, p, opt_state, perm, idx in zip(levels, positions, sizes, params, states,
                                                   perms, fibres):
      tokens = x[images].reshape(-1, x.shape[-1])

      def fibre_step(c, fibre, pos=pos, s=s, perm=perm, tokens=tokens):
        p, opt_state = c
        loss, grads = jax.value_and_grad(fibre_loss)(p, perm, tokens[fibre], pos[fibre % s],
                                                     cfg.clamp)
        updates, opt_state = _ADAM.update(grads, opt_state)
        p = jax.tree.map(lambda a, u: a - rates[g] * u, p, updates)
        return (p, opt_state), loss

      (p, opt_state), level_losses = jax.lax.scan(fibre_step, (p, opt_state), idx)
      new_params.append(p)
      new_states.append(opt_state)
      losses.append(level_losses[-1])
    return (new_params, new_states), sum(losses)

  # A loop with traced bounds: one program serves every round length.
  return jax.lax.fori_loop(start, start + count, lambda i, c: batch_step(c[0], i),
                           (carry, jnp.zeros((), jnp.float32)))


@functools.partial(jax.jit, static_argnums=(0,))
def _log_likelihood(cfg: CFlow, levels: tuple, params: list, perms: list):
  out = []
  for x, p, perm in zip(levels, params, perms):
    n, h, w, _ = x.shape
    tok, pos = x.reshape(n * h * w, -1), _positions(cfg, x)
    cond = jnp.tile(pos, (n, 1))
    lp = jax.lax.map(lambda a: log_prob_per_dim(p, perm, a[0][None], a[1][None],
                                                cfg.clamp)[0],
                     (tok, cond), batch_size=min(cfg.score_block, tok.shape[0]))
    out.append(lp.reshape(n, h, w))
  return tuple(out)


def _summed_probabilities(log_likelihoods: Sequence[jax.Array], hw: tuple[int, int],
                          level_max: Sequence[float] | None = None) -> np.ndarray:
  """Per level exp(log p - its maximum), upsampled to hw and summed over the levels."""
  total = None
  for i, lp in enumerate(log_likelihoods):
    lp = np.asarray(lp, np.float64)
    prob = np.exp(lp - (lp.max() if level_max is None else level_max[i]))
    mh = common.bilinear_matrix(lp.shape[1], hw[0], True).astype(np.float64)
    mw = common.bilinear_matrix(lp.shape[2], hw[1], True).astype(np.float64)
    up = np.einsum("Hh,mhw,Ww->mHW", mh, prob, mw, optimize=True)   # two matmuls
    total = up if total is None else total + up
  return total


def _maps_from_log_likelihood(log_likelihoods: Sequence[jax.Array], hw: tuple[int, int],
                              sigma: float, calibration: dict | None = None
                              ) -> tuple[np.ndarray, np.ndarray]:
  """exp(log p - max over the test set) per level, upsampled and summed; map = max - sum.

  In float64 on the host, as the reference does it: max - sum in float32 cannot tell apart
  sums below ~1e-7 of the maximum (log-likelihoods 16 to 37 below the test set's best, common
  for anomalous tokens), which ties the image scores of such images; float64 does.
  calibration: fixed maxima ({"level_max": [...], "map_max": ...}, see CFlow.calibrated)
  instead of the test set's.
  """
  level_max = None if calibration is None else calibration["level_max"]
  total = _summed_probabilities(log_likelihoods, hw, level_max)
  maps = (total.max() if calibration is None else calibration["map_max"]) - total
  if sigma:
    gh = common.gaussian_matrix(hw[0], float(sigma)).astype(np.float64)
    gw = common.gaussian_matrix(hw[1], float(sigma)).astype(np.float64)
    maps = np.einsum("Hh,mhw,Ww->mHW", gh, maps, gw, optimize=True)
  return maps.reshape(maps.shape[0], -1).max(axis=1), maps.astype(np.float32)
