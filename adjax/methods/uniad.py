"""UniAD: one feature-reconstruction transformer for all classes of a dataset (docs/method.md
section 6).

The levels (resized bilinearly, align_corners True, to the first level's grid when they
differ) are concatenated along channels, projected to `hidden_dim` (512), and reconstructed by
UniAD's post-norm transformer: `encoder_layers` self-attention layers over the tokens, then
`decoder_layers` layers, each with its own learned queries (one per grid position), that
attend first to the encoder output and then to the previous decoder layer's output (the
encoder output for the first), a LayerNorm at the end. UniAD's neighbour mask hides from each
query the keys of the 7 x 7 window around its own position, itself included (every attention):
a token cannot copy itself or its neighbours, which is what keeps the model from learning the
identity and reconstructing anomalies too. 8 heads, FFN 2048 with ReLU, learned row/column
position embeddings added to queries and keys. A linear layer maps back to the input channels.
Linear layers start Xavier-uniform with zero biases, as UniAD's config initialises them. In
training, feature jitter adds Gaussian noise of scale |f| / C * jitter_scale to the input
tokens of a whole batch with probability jitter_prob (one draw a batch, as UniAD); the loss is
the MSE to the clean features.
AdamW (lr 1e-4, weight decay 1e-4), lr x 0.1 after 80 % of the steps, global-norm clipping
0.1, as UniAD's MVTec config.

Score: the L2 norm of the reconstruction error per token, upsampled bilinearly (align
corners), unsmoothed as in UniAD and the ADPretrain reference (`sigma` > 0 smooths it with a
Gaussian); the image score is the map's maximum.

Multi-class: `fit` accepts either one list of levels (the training images of every class
concatenated along N) or a list of such lists, one per class, which it concatenates (the
classes must share grids and channels).

Dropout (`dropout`, 0.1 as UniAD) in training, where UniAD's layers have it: on the attention
weights of every attention, on each attention's output before its residual sum, after the FFN's
ReLU, and on the FFN's output before its residual sum.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adjax.methods.base import MethodFacts
from adjax.methods import common


@dataclasses.dataclass(frozen=True)
class UniAD(MethodFacts):
  """Settings of UniAD (defaults: docs/method.md section 6 and UniAD's MVTec config).

  Attributes:
    hidden_dim: transformer width.
    num_heads: attention heads.
    ffn_dim: feed-forward width.
    encoder_layers, decoder_layers: depths.
    neighbour_size: side of the window hidden from each query (0: full attention); it must
      leave every query some key, i.e. be smaller than the grid.
    jitter_scale, jitter_prob: feature jitter.
    dropout: dropout rate in training (attention weights, residual branches, FFN).
    lr, weight_decay: AdamW.
    lr_drop_ratio: share of the steps after which the lr is multiplied by 0.1.
    clip_norm: global gradient-norm clipping (0: none).
    epochs, batch_size: passes over the training images, images per step.
    score_batch: images per block when scoring.
    sigma: Gaussian smoothing of the map, pixels.
    num_levels: use the last this many levels (None: all).
  """
  per_dataset = True          # one model for all classes of a dataset
  hidden_dim: int = 512
  num_heads: int = 8
  ffn_dim: int = 2048
  encoder_layers: int = 4
  decoder_layers: int = 4
  neighbour_size: int = 7
  jitter_scale: float = 20.0
  jitter_prob: float = 1.0
  dropout: float = 0.1
  lr: float = 1e-4
  weight_decay: float = 1e-4
  lr_drop_ratio: float = 0.8
  clip_norm: float = 0.1
  epochs: int = 1000
  batch_size: int = 8
  score_batch: int = 32
  sigma: float = 0.0
  num_levels: int | None = None

  name = "uniad"

  def prepare(self, levels: Any, what: str) -> jax.Array:
    """Levels -> concatenated tokens (N, h, w, sum C_k) on the first level's grid."""
    levels = common.last_levels(common.check_levels(levels, what), self.num_levels)
    hw = tuple(levels[0].shape[1:3])
    return jnp.concatenate([common.resize_features(x, hw, align_corners=True)
                            for x in levels], axis=-1)

  def init(self, rng: jax.Array, h: int, w: int, c: int) -> dict:
    """Initial parameters for an h x w grid of c-channel tokens."""
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"uniad: dropout must be in [0, 1), got {self.dropout}")
    if self.hidden_dim % self.num_heads or self.hidden_dim % 2:
      raise ValueError(f"uniad: hidden_dim {self.hidden_dim} must be even and divisible by "
                       f"num_heads {self.num_heads}")
    neighbour_mask(int(h), int(w), self.neighbour_size)   # refuses a window that hides all
    return _init(self, common.host_rng(rng), int(h), int(w), int(c))

  def fit(self, train_levels: Any, rng: jax.Array) -> dict:
    """Trains the one model of a dataset.

    Args:
      train_levels: list of (N, h_k, w_k, C_k), or a list of those (one per class).
      rng: PRNG key.

    Returns:
      {"params", "loss" (last step)}.
    """
    if (isinstance(train_levels, (list, tuple)) and train_levels
        and isinstance(train_levels[0], (list, tuple))):
      per_class = [self.prepare(lv, f"train_levels[{i}]") for i, lv in enumerate(train_levels)]
      shapes = {tuple(x.shape[1:]) for x in per_class}
      if len(shapes) > 1:
        raise ValueError(f"uniad: the classes' features differ in shape: {sorted(shapes)}")
      x = jnp.concatenate(per_class, axis=0)
    else:
      x = self.prepare(train_levels, "train_levels")
    k_init, k_train = jax.random.split(rng)
    params = self.init(k_init, *x.shape[1:])
    steps = self.epochs * common.epoch_steps(x.shape[0], self.batch_size)
    params, loss = _train(self, x, params, k_train, steps)
    return {"params": params, "loss": loss}

  def reconstruct(self, state: dict, levels: Any) -> tuple[jax.Array, jax.Array]:
    """(features, reconstruction), both (M, h, w, sum C_k)."""
    x = self.prepare(levels, "levels")
    return x, _reconstruct(self, state["params"], x)

  def score(self, state: dict, test_levels: Any, image_size: Any):
    """Scores test images (of any class of the dataset).

    Args:
      state: from `fit`.
      test_levels: list of (M, h_k, w_k, C_k).
      image_size: int or (H, W).

    Returns:
      (image_scores (M,), maps (M, H, W)) float32.
    """
    x = self.prepare(test_levels, "test_levels")
    rec = _reconstruct(self, state["params"], x)
    return _finish(self, x, rec, common.image_hw(image_size))


def _xavier_linear(gen: np.random.Generator, fan_in: int, fan_out: int,
                   bound_shape: tuple[int, int] | None = None) -> dict:
  """Xavier-uniform weight (bound from `bound_shape`, default (fan_out, fan_in)), zero bias."""
  out_dim, in_dim = bound_shape or (fan_out, fan_in)
  bound = math.sqrt(6.0 / (in_dim + out_dim))
  return {"w": jnp.asarray(gen.uniform(-bound, bound, (fan_in, fan_out)), jnp.float32),
          "b": jnp.zeros((fan_out,), jnp.float32)}


def _init(cfg: UniAD, gen: np.random.Generator, h: int, w: int, c: int) -> dict:
  d, f = cfg.hidden_dim, cfg.ffn_dim
  lin = lambda i, o: _xavier_linear(gen, i, o)

  def attn():
    # torch's MultiheadAttention draws q, k and v from one (3d, d) Xavier-uniform matrix.
    qkv = lambda: _xavier_linear(gen, d, d, bound_shape=(3 * d, d))
    return {"q": qkv(), "k": qkv(), "v": qkv(), "o": lin(d, d)}

  def norm():
    return {"scale": jnp.asarray(np.ones(d, np.float32)),
            "bias": jnp.asarray(np.zeros(d, np.float32))}

  enc = [{"attn": attn(), "n1": norm(), "ff1": lin(d, f), "ff2": lin(f, d), "n2": norm()}
         for _ in range(cfg.encoder_layers)]
  # Each decoder layer has its own learned queries (nn.Embedding: N(0, 1)).
  dec = [{"queries": jnp.asarray(gen.standard_normal((h * w, d)), jnp.float32),
          "memory_attn": attn(), "n1": norm(), "previous_attn": attn(), "n2": norm(),
          "ff1": lin(d, f), "ff2": lin(f, d), "n3": norm()} for _ in range(cfg.decoder_layers)]
  return {
      "in_proj": lin(c, d), "out_proj": lin(d, c),
      # Learned row/column positions, uniform in [0, 1) as UniAD's nn.init.uniform_.
      "row_embed": jnp.asarray(gen.uniform(size=(h, d // 2)), jnp.float32),
      "col_embed": jnp.asarray(gen.uniform(size=(w, d // 2)), jnp.float32),
      "encoder": enc, "decoder": dec, "decoder_norm": norm(),
  }


def neighbour_mask(h: int, w: int, size: int) -> np.ndarray:
  """(h w, h w) bool: key j is visible from query i when it lies *outside* the size x size
  window centred on i (UniAD's neighbour-masked attention; size 0: every key visible)."""
  if size <= 0:
    return np.ones((h * w, h * w), bool)
  r = size // 2
  yy, xx = np.divmod(np.arange(h * w), w)
  within = ((np.abs(yy[:, None] - yy[None, :]) <= r)
            & (np.abs(xx[:, None] - xx[None, :]) <= r))
  visible = ~within
  if not visible.any(axis=1).all():
    raise ValueError(f"uniad: neighbour_size {size} hides every key of a {h} x {w} grid from "
                     f"some query; use a neighbour_size below {max(h, w)} (or 0 for none)")
  return visible


def _layer_norm(p, x):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _no_dropout(x: jax.Array) -> jax.Array:
  return x


class _Dropout:
  """Inverted dropout with a fresh key at every call (one call per dropout site, in order)."""

  def __init__(self, rng: jax.Array, rate: float):
    self.rng, self.rate, self.calls = rng, rate, 0

  def __call__(self, x: jax.Array) -> jax.Array:
    key = jax.random.fold_in(self.rng, self.calls)
    self.calls += 1
    keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.rate), 0.0)


def _attention(p, q_in, k_in, v_in, mask, heads, drop: Callable = _no_dropout):
  b, lq, d = q_in.shape
  hd = d // heads
  split = lambda t: t.reshape(b, -1, heads, hd)
  q = split(common.dense(p["q"], q_in))
  k = split(common.dense(p["k"], k_in))
  v = split(common.dense(p["v"], v_in))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
  logits = jnp.where(mask[None, None], logits, -jnp.inf)
  weights = drop(jax.nn.softmax(logits, -1))     # (B, heads, L_q, L_k)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, lq, d)
  return common.dense(p["o"], out)


def _forward(cfg: UniAD, params: dict, tokens: jax.Array,
             drop: Callable = _no_dropout) -> jax.Array:
  """(B, L, C) input tokens -> (B, L, C) reconstruction.

  drop: applied at every dropout site, in UniAD's order (identity when scoring)."""
  h, w = params["row_embed"].shape[0], params["col_embed"].shape[0]
  half = params["row_embed"].shape[1]
  pos = jnp.concatenate([jnp.broadcast_to(params["col_embed"][None], (h, w, half)),
                         jnp.broadcast_to(params["row_embed"][:, None], (h, w, half))],
                        -1).reshape(1, h * w, -1)
  mask = jnp.asarray(neighbour_mask(h, w, cfg.neighbour_size))
  heads = cfg.num_heads
  src = common.dense(params["in_proj"], tokens)
  ffn = lambda p, x: common.dense(p["ff2"], drop(jax.nn.relu(common.dense(p["ff1"], x))))
  for p in params["encoder"]:
    q = src + pos
    src = _layer_norm(p["n1"], src + drop(_attention(p["attn"], q, q, src, mask, heads, drop)))
    src = _layer_norm(p["n2"], src + drop(ffn(p, src)))
  memory = src
  out = memory
  for p in params["decoder"]:
    tgt = jnp.broadcast_to(p["queries"][None], memory.shape)
    tgt = _layer_norm(p["n1"], tgt + drop(_attention(p["memory_attn"], tgt + pos, memory + pos,
                                                     memory, mask, heads, drop)))
    tgt = _layer_norm(p["n2"], tgt + drop(_attention(p["previous_attn"], tgt + pos, out + pos,
                                                     out, mask, heads, drop)))
    out = _layer_norm(p["n3"], tgt + drop(ffn(p, tgt)))
  return common.dense(params["out_proj"], _layer_norm(params["decoder_norm"], out))


def _jitter(cfg: UniAD, rng: jax.Array, tokens: jax.Array) -> jax.Array:
  k_noise, k_apply = jax.random.split(rng)
  norms = jnp.linalg.norm(tokens, axis=-1, keepdims=True) / tokens.shape[-1]
  noise = jax.random.normal(k_noise, tokens.shape) * norms * cfg.jitter_scale
  apply = jax.random.uniform(k_apply, ()) <= cfg.jitter_prob   # one draw a batch, as UniAD
  return tokens + jnp.where(apply, noise, 0.0)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _train(cfg: UniAD, x: jax.Array, params: dict, rng: jax.Array, steps: int):
  n, h, w, c = x.shape
  tokens = x.reshape(n, h * w, c)
  bs = min(cfg.batch_size, n)
  per_epoch = common.epoch_steps(n, bs)
  schedule = optax.piecewise_constant_schedule(
      cfg.lr, {max(1, int(cfg.lr_drop_ratio * steps)): 0.1})
  opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  if cfg.clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)

  def loss_fn(params, batch, key):
    k_jitter, k_drop = jax.random.split(key)
    drop = _Dropout(k_drop, cfg.dropout) if cfg.dropout > 0 else _no_dropout
    rec = _forward(cfg, params, _jitter(cfg, k_jitter, batch), drop)
    return jnp.mean((rec - batch) ** 2)

  def step(carry, i):
    params, opt_state = carry
    epoch, j = i // per_epoch, i % per_epoch
    perm = jax.random.permutation(jax.random.fold_in(rng, epoch), n)
    idx = jax.lax.dynamic_slice(perm, (j * bs,), (bs,))
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens[idx],
                                              jax.random.fold_in(rng, steps + i))
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
  return params, losses[-1]


@functools.partial(jax.jit, static_argnums=(0,))
def _reconstruct(cfg: UniAD, params: dict, x: jax.Array) -> jax.Array:
  n, h, w, c = x.shape
  rec = jax.lax.map(lambda t: _forward(cfg, params, t[None])[0], x.reshape(n, h * w, c),
                    batch_size=min(cfg.score_batch, n))
  return rec.reshape(n, h, w, c)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _finish(cfg: UniAD, x: jax.Array, rec: jax.Array, hw: tuple[int, int]):
  err = jnp.sqrt(jnp.sum((rec - x) ** 2, axis=-1))
  maps = common.token_maps_to_image([err], hw, align_corners=True, sigma=cfg.sigma)
  return maps.reshape(maps.shape[0], -1).max(axis=1), maps
