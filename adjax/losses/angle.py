"""Angle-oriented contrastive loss (docs/method.md section 4), blocked so that memory stays bounded.

For features of the same N tokens under two views, u = normalize(e1 - c), v = normalize(e2 - c)
and F = [u; v] with labels [m; m]. Row a of F has the positive <u_i, v_i> / tau and its
negatives are the rows of the *opposite* label; its loss is -pos_a + log sum_neg exp(<F_a, F_b> /
tau) (the positive is not in the denominator). The loss is the mean over all 2N rows, and 0 when
the batch has no anomalous or no normal token.

A dense version holds the 2N x 2N similarity matrix (batch 32 x 256 tokens: 1 GiB per level, and
as much again for its gradient) although only pairs of opposite labels count. Three exact forms,
each with a custom VJP that recomputes what it needs block by block:

* tau >= 0.025 (the default 0.15): every negative pair has one row of the rarer label, so only
  those rows' similarities against all 2N rows are computed, in blocks of MINORITY_ROW_BLOCK
  rows (a loop whose trip count follows the labels). With anomalies a few per cent of the
  tokens that is ~1/8 of the dense work; at a 50/50 split, the same. The rows are unit
  vectors, so every logit is at most 1/tau and exp(logit - 1/tau) needs no running maximum.
  Under shard_map each device takes its own rarer-label rows against every device's rows and
  the column sums (the other label's log-sum-exp, and its gradient) are reduce-scattered.
* any tau (below 0.025 the fixed shift could underflow float32): blocks of rows against blocks
  of columns with a running maximum; on one device, when all rows fit one block, the forward
  keeps its similarities for the backward; under shard_map, each device's rows against every
  device's rows.

Labels act as weights: there is no boolean indexing and every shape is static.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_BLOCK_SIZE = 2048
# Rows of the rarer label per block (`_fold_minority_blocks`; see `rarer_label_block`).
MINORITY_ROW_BLOCK = 256
_PAD_LABEL = -1.0  # padding rows: neither normal (0) nor anomalous (1), so never a negative


def _normalize(x: Array, eps: float = 1e-12) -> Array:
  # torch.nn.functional.normalize: x / max(||x||, eps).
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def _negative_mask(row_labels: Array, col_labels: Array) -> Array:
  # Opposite labels sum to exactly 1; padding (-1) never does with 0, 1 or -1.
  return (row_labels[:, None] + col_labels[None, :]) == 1.0


def _blocks(x: Array, block: int) -> Array:
  return x.reshape(x.shape[0] // block, block, *x.shape[1:])


def _no_negatives(rows: Array) -> tuple[Array, Array]:
  """Running (max, sum of exp(sim - max)) per row before any negative is seen.

  Built from `rows` so that under shard_map it has the rows' (per-device) type."""
  return jnp.full_like(rows[:, 0], -jnp.inf), jnp.zeros_like(rows[:, 0])


def _add_negatives(state: tuple[Array, Array], sims: Array,
                   negative: Array) -> tuple[Array, Array]:
  """Folds a block of similarities (rows x cols, only `negative` ones count) into the state."""
  running_max, running_sum = state
  sims = jnp.where(negative, sims, -jnp.inf)
  new_max = jnp.maximum(running_max, jnp.max(sims, axis=1))
  safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
  running_sum = (running_sum * jnp.exp(jnp.where(jnp.isfinite(running_max),
                                                 running_max - safe_max, -jnp.inf))
                 + jnp.sum(jnp.exp(sims - safe_max[:, None]), axis=1))
  return new_max, running_sum


def _lse_of(state: tuple[Array, Array]) -> Array:
  """The log-sum-exp of the state; rows without negatives get 0."""
  running_max, running_sum = state
  return jnp.where(running_sum > 0, running_max + jnp.log(jnp.maximum(running_sum, 1e-30)), 0.0)


def _row_block_lse(rows: Array, row_labels: Array, cols: Array, col_labels: Array,
                   inv_temp: float) -> Array:
  """log sum_{b negative} exp(<row, col_b> * inv_temp) for a block of rows, streaming over
  column blocks; rows without negatives get 0."""

  def step(state, col_block):
    cb, cl = col_block
    return _add_negatives(state, (rows @ cb.T) * inv_temp,
                          _negative_mask(row_labels, cl)), None

  state, _ = jax.lax.scan(step, _no_negatives(rows), (cols, col_labels))
  return _lse_of(state)


def _lse_over(rows: Array, row_labels: Array, cols: Array, col_labels: Array, inv_temp: float,
              block: int) -> Array:
  """Per-row log-sum-exp over negatives among `cols`; row and column counts multiples of block."""
  col_blocks = (_blocks(cols, block), _blocks(col_labels, block))
  per_block = jax.lax.map(
      lambda rb: _row_block_lse(rb[0], rb[1], *col_blocks, inv_temp),
      (_blocks(rows, block), _blocks(row_labels, block)))
  return per_block.reshape(-1)


def _pair_weights(sims: Array, negative: Array, row_lse: Array, row_grad: Array, col_lse: Array,
                  col_grad: Array) -> Array:
  """g_a P_ab + g_b P_ba for a block of rows a and columns b, P_ab = exp(S_ab - lse_a) on
  negatives: the coefficient of F_b in the gradient of sum_a g_a lse_a for row a (S symmetric)."""
  return (row_grad[:, None] * jnp.exp(jnp.where(negative, sims - row_lse[:, None], -jnp.inf))
          + col_grad[None, :] * jnp.exp(jnp.where(negative, sims - col_lse[None, :], -jnp.inf)))


def _lse_gradient(rows: Array, row_labels: Array, row_lse: Array, row_grad: Array, cols: Array,
                  col_labels: Array, col_lse: Array, col_grad: Array, inv_temp: float,
                  block: int) -> Array:
  """d(sum_a g_a lse_a)/d rows, where the sum runs over *every* row a of the full set (whose
  features are `cols`) and `rows` is a subset of them.

  Row x enters lse_x as a row and every lse_a as a column: sum_b (g_x P_xb + g_b P_bx) F_b with
  P_ab = exp(S_ab - lse_a) on negatives. S is symmetric, so both terms need only the
  similarities of x's row block against each column block, and the columns' lse and g.
  """
  col_blocks = (_blocks(cols, block), _blocks(col_labels, block), _blocks(col_lse, block),
                _blocks(col_grad, block))

  def row_block(rb):
    rows_b, labels_b, lse_b, grad_b = rb

    def step(acc, cb):
      cols_c, labels_c, lse_c, grad_c = cb
      sims = (rows_b @ cols_c.T) * inv_temp
      weight = _pair_weights(sims, _negative_mask(labels_b, labels_c), lse_b, grad_b, lse_c,
                             grad_c)
      return acc + weight @ cols_c, None

    acc, _ = jax.lax.scan(step, jnp.zeros_like(rows_b), col_blocks)
    return acc * inv_temp

  grad = jax.lax.map(row_block, (_blocks(rows, block), _blocks(row_labels, block),
                                 _blocks(row_lse, block), _blocks(row_grad, block)))
  return grad.reshape(rows.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _negative_lse(features: Array, labels: Array, inv_temp: float, block: int) -> Array:
  """Per-row log-sum-exp over negatives; features (M, D) with M a multiple of block."""
  return _lse_over(features, labels, features, labels, inv_temp, block)


def _negative_lse_fwd(features, labels, inv_temp, block):
  lse = _negative_lse(features, labels, inv_temp, block)
  return lse, (features, labels, lse)


def _negative_lse_bwd(inv_temp, block, residuals, grad_lse):
  features, labels, lse = residuals
  grad = _lse_gradient(features, labels, lse, grad_lse, features, labels, lse, grad_lse,
                       inv_temp, block)
  return grad, jnp.zeros_like(labels)


_negative_lse.defvjp(_negative_lse_fwd, _negative_lse_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _negative_lse_one_block(features: Array, labels: Array, inv_temp: float) -> Array:
  """`_negative_lse` when all rows fit one block: the forward keeps its similarities (block^2
  floats) for the backward instead of recomputing them, one matmul less per call."""
  return _negative_lse_one_block_fwd(features, labels, inv_temp)[0]


def _negative_lse_one_block_fwd(features, labels, inv_temp):
  sims = (features @ features.T) * inv_temp
  lse = _lse_of(_add_negatives(_no_negatives(features), sims, _negative_mask(labels, labels)))
  return lse, (features, labels, sims, lse)


def _negative_lse_one_block_bwd(inv_temp, residuals, grad_lse):
  features, labels, sims, lse = residuals
  weight = _pair_weights(sims, _negative_mask(labels, labels), lse, grad_lse, lse, grad_lse)
  return (weight @ features) * inv_temp, jnp.zeros_like(labels)


_negative_lse_one_block.defvjp(_negative_lse_one_block_fwd, _negative_lse_one_block_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _sharded_negative_lse(features: Array, labels: Array, inv_temp: float, block: int,
                          axis_name: str) -> Array:
  """`_negative_lse` for this device's rows inside shard_map: the columns are every device's
  rows (all-gathered), so each device computes only its share of the 2N x 2N similarities."""
  return _sharded_negative_lse_fwd(features, labels, inv_temp, block, axis_name)[0]


def _sharded_negative_lse_fwd(features, labels, inv_temp, block, axis_name):
  cols = jax.lax.all_gather(features, axis_name, tiled=True)
  col_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
  lse = _lse_over(features, labels, cols, col_labels, inv_temp, block)
  return lse, (features, labels, cols, col_labels, lse)


def _sharded_negative_lse_bwd(inv_temp, block, axis_name, residuals, grad_lse):
  # The gathered lse and g make each device's gradient complete: no reduction afterwards.
  features, labels, cols, col_labels, lse = residuals
  col_lse = jax.lax.all_gather(lse, axis_name, tiled=True)
  col_grad = jax.lax.all_gather(grad_lse, axis_name, tiled=True)
  grad = _lse_gradient(features, labels, lse, grad_lse, cols, col_labels, col_lse, col_grad,
                       inv_temp, block)
  return grad, jnp.zeros_like(labels)


_sharded_negative_lse.defvjp(_sharded_negative_lse_fwd, _sharded_negative_lse_bwd)


def _fixed_shift_is_safe(inv_temp: float) -> bool:
  """Whether the log-sum-exp may use the constant shift inv_temp instead of a running maximum.

  Why: the rows are unit vectors (or zero padding), so every similarity is at most inv_temp
  and exp(sim - inv_temp) lies in [exp(-2 inv_temp), 1]: with that constant shift the forward
  pass needs no row maximum, and value and gradient share one exponential per pair. Below
  tau ~ 0.025 the smallest terms could underflow float32, and the running maximum is used.
  """
  return 2.0 * inv_temp <= 80.0


def rarer_label_block(tokens: int, block_size: int = DEFAULT_BLOCK_SIZE,
                      sharded: bool = False) -> int:
  """Rows per block of the rarer-label form for `tokens` tokens per view (this device's under
  shard_map): the rarer label has at most `tokens` of the 2 x tokens rows on one device, all
  of a device's rows under shard_map, so no block needs more."""
  return min(block_size, MINORITY_ROW_BLOCK, 2 * tokens if sharded else tokens)


def _fold_minority_blocks(rows: Array, row_labels: Array, cols: Array, col_labels: Array,
                          rarer: Array, inv_temp: float, block: int, fold, init):
  """Folds `fold(carry, start, index, block_rows, shifted)` over blocks of the rarer label's
  rows among `rows` (all rows, or this device's), against all `cols`.

  Every negative pair joins one row of the rarer ("minority") label and one of the other, so
  the similarities of the minority rows against all rows hold every negative pair exactly once:
  count x 2N similarities instead of (2N)^2, never more than half (count <= N). The minority
  rows are taken in sorted order (minority first): a block holds sorted positions
  [start, start + block), `index` their positions in `rows`. `shifted` is exp(sim - inv_temp)
  on (minority row, majority column) pairs and 0 elsewhere, (block, cols). The number of blocks
  follows the labels (a loop with a data-dependent trip count; shapes stay static).

  Returns the final carry, the minority mask of `rows`, and `unsort`, which maps a per-row
  array in sorted order (padded to a multiple of block) back to the order of `rows`.
  """
  minority = row_labels == rarer                      # padding (-1) is in neither set
  majority_cols = col_labels == 1.0 - rarer
  count = jnp.sum(minority)
  num_rows = rows.shape[0]
  order = jnp.argsort(~minority, stable=True)         # minority rows first
  padded_order = jnp.pad(order, (0, -(-num_rows // block) * block - num_rows))

  def body(i, carry):
    start = i * block
    index = jax.lax.dynamic_slice(padded_order, (start,), (block,))
    block_rows = rows[index]
    # Positions past `count` hold majority, padding or (past the rows) filler: masked out.
    real = start + jnp.arange(block) < count
    sims = (block_rows @ cols.T) * inv_temp
    shifted = jnp.where(real[:, None] & majority_cols[None, :], jnp.exp(sims - inv_temp), 0.0)
    return fold(carry, start, index, block_rows, shifted)

  carry = jax.lax.fori_loop(0, (count + block - 1) // block, body, init)
  inverse = jnp.argsort(order)
  return carry, minority, lambda sorted_values: sorted_values[inverse]


def _sorted_buffer(rows: Array, block: int, *trailing: int) -> Array:
  """Zeros for a per-row quantity in sorted order, padded to a multiple of block."""
  return jnp.zeros((-(-rows.shape[0] // block) * block, *trailing), rows.dtype)


class _Columns:
  """The columns a device's rows are compared with, and the column-wise reductions back.

  One device: the rows themselves. Inside shard_map: every device's rows (all-gathered in
  device order), and a column-wise sum comes back to its owner as a reduce-scatter."""

  def __init__(self, axis_name: Optional[str]):
    self.axis_name = axis_name

  def gather(self, x: Array) -> Array:
    return x if self.axis_name is None else jax.lax.all_gather(x, self.axis_name, tiled=True)

  def sum_to_owner(self, x: Array) -> Array:
    return (x if self.axis_name is None else
            jax.lax.psum_scatter(x, self.axis_name, scatter_dimension=0, tiled=True))

  def varying(self, *xs: Array) -> tuple[Array, ...]:
    """Fresh arrays typed as differing between devices (a loop carry that becomes so must
    start so under shard_map)."""
    if self.axis_name is None:
      return xs
    return tuple(jax.lax.pcast(x, self.axis_name, to="varying") for x in xs)

  def total(self, x: Array) -> Array:
    return x if self.axis_name is None else jax.lax.psum(x, self.axis_name)

  def rarer_label(self, labels: Array) -> Array:
    """1.0 if the batch has no more anomalous than normal tokens, else 0.0 (global)."""
    anomalous = self.total(jnp.sum(labels == 1.0))
    return jnp.where(anomalous <= self.total(jnp.sum(labels == 0.0)), 1.0, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _minority_negative_lse(features: Array, labels: Array, inv_temp: float, block: int,
                           axis_name: Optional[str]) -> Array:
  """Per-row log-sum-exp over negatives from the minority rows' similarities only (unit-norm
  features, `_fixed_shift_is_safe(inv_temp)`): a minority row's negatives are in its row, a
  majority row's in its column. With axis_name, `features` are this device's rows."""
  return _minority_negative_lse_fwd(features, labels, inv_temp, block, axis_name)[0]


def _minority_negative_lse_fwd(features, labels, inv_temp, block, axis_name):
  columns = _Columns(axis_name)
  cols, col_labels = columns.gather(features), columns.gather(labels)
  rarer = columns.rarer_label(labels)

  def fold(sums, start, index, block_rows, shifted):
    row_sums, col_sums = sums
    row_sums = jax.lax.dynamic_update_slice(row_sums, jnp.sum(shifted, axis=1), (start,))
    return row_sums, col_sums + jnp.sum(shifted, axis=0)

  init = columns.varying(_sorted_buffer(features, block), jnp.zeros(cols.shape[:1], cols.dtype))
  (row_sums, col_sums), minority, unsort = _fold_minority_blocks(
      features, labels, cols, col_labels, rarer, inv_temp, block, fold, init)
  sums = jnp.where(minority, unsort(row_sums), columns.sum_to_owner(col_sums))
  lse = _lse_of((jnp.full_like(sums, inv_temp), sums))
  return lse, (features, labels, lse)


def _minority_negative_lse_bwd(inv_temp, block, axis_name, residuals, grad_lse):
  features, labels, lse = residuals
  columns = _Columns(axis_name)
  cols, col_labels = columns.gather(features), columns.gather(labels)
  # P_ab = shifted_ab * exp(inv_temp - lse_a): per-row factors of the pair weights.
  row_factor = grad_lse * jnp.exp(inv_temp - lse)
  col_factor = columns.gather(row_factor)

  def fold(grads, start, index, block_rows, shifted):
    majority_grad, minority_grad = grads
    weight = shifted * (row_factor[index][:, None] + col_factor[None, :])   # symmetric W_ab
    majority_grad = majority_grad + jax.lax.dot_general(weight, block_rows,
                                                        (((0,), (0,)), ((), ())))
    minority_grad = jax.lax.dynamic_update_slice(minority_grad, weight @ cols, (start, 0))
    return majority_grad, minority_grad

  init = columns.varying(jnp.zeros(cols.shape, cols.dtype),
                         _sorted_buffer(features, block, features.shape[1]))
  (majority_grad, minority_grad), _, unsort = _fold_minority_blocks(
      features, labels, cols, col_labels, columns.rarer_label(labels), inv_temp, block, fold,
      init)
  # Each part is zero on the other set's rows.
  grad = columns.sum_to_owner(majority_grad) + unsort(minority_grad)
  return grad * inv_temp, jnp.zeros_like(labels)


_minority_negative_lse.defvjp(_minority_negative_lse_fwd, _minority_negative_lse_bwd)


def angle_loss(e1: Array, e2: Array, labels: Array, center: Optional[Array] = None,
               temperature: float = 0.15, *, weights: Optional[Array] = None,
               block_size: int = DEFAULT_BLOCK_SIZE,
               axis_name: Optional[str] = None) -> Array:
  """Angle-oriented contrastive loss of one level.

  Args:
    e1, e2: (N, D) projected features of the same tokens under two views.
    labels: (N,) in {0, 1}, 1 = anomalous.
    center: (D,) the level's centre, subtracted before normalising; None for no centre.
    temperature: tau.
    weights: optional (N,) in {0, 1}: 0 drops a token entirely (padding, unused references);
      static shapes for variable token counts.
    block_size: memory cap: for tau >= 0.025, blocks of at most min(block_size,
      MINORITY_ROW_BLOCK) rows of the rarer label against all 2N rows are held at once;
      below, block_size x block_size similarities, the inputs padded to a multiple of it.
      Value and gradient do not depend on it.
    axis_name: inside `jax.shard_map` over this mesh axis, e1, e2, labels and weights are this
      device's rows of the global batch: each device computes its own rows against every
      device's rows (all-gathered; for tau >= 0.025 only its rows of the rarer label, the
      column sums reduce-scattered back) and the result is the global loss, the same as on one
      device, for 1 / devices of the similarity work. None: the arrays are the batch.

  Returns:
    Scalar float32 loss; 0 when the kept tokens include no anomalous or no normal one.
  """
  e1 = jnp.asarray(e1, jnp.float32)
  e2 = jnp.asarray(e2, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  if e1.ndim != 2 or e1.shape != e2.shape or labels.shape != e1.shape[:1]:
    raise ValueError(f"angle_loss expects e1, e2 (N, D) and labels (N,), got {e1.shape}, "
                     f"{e2.shape}, {labels.shape}")
  keep = jnp.ones_like(labels) if weights is None else jnp.asarray(weights, jnp.float32)
  if center is not None:
    center = jnp.asarray(center, jnp.float32)
    e1, e2 = e1 - center, e2 - center
  u, v = _normalize(e1), _normalize(e2)
  n = labels.shape[0]
  row_labels = jnp.where(keep > 0, labels, _PAD_LABEL)
  features = jnp.concatenate([u, v], axis=0)
  all_labels = jnp.concatenate([row_labels, row_labels], axis=0)
  inv_temp = 1.0 / temperature
  total = _Columns(axis_name).total
  if _fixed_shift_is_safe(inv_temp):
    lse = _minority_negative_lse(features, all_labels, inv_temp,
                                 rarer_label_block(n, block_size, axis_name is not None),
                                 axis_name)
  else:
    block = min(block_size, 2 * n)
    padded = -(-2 * n // block) * block
    features = jnp.pad(features, ((0, padded - 2 * n), (0, 0)))
    all_labels = jnp.pad(all_labels, (0, padded - 2 * n), constant_values=_PAD_LABEL)
    if axis_name is None:
      lse = (_negative_lse_one_block(features, all_labels, inv_temp) if padded == block else
             _negative_lse(features, all_labels, inv_temp, block))[:2 * n]
    else:
      # Columns come in device order [u_0; v_0; pad; u_1; ...]: the negatives of a row are the
      # same set as on one device, and padding rows are never negatives.
      lse = _sharded_negative_lse(features, all_labels, inv_temp, block, axis_name)[:2 * n]
  positives = jnp.sum(u * v, axis=-1) / temperature
  kept_rows = jnp.concatenate([keep, keep])
  count = jnp.maximum(total(jnp.sum(kept_rows)), 1.0)
  loss = total(jnp.sum(lse * kept_rows) - 2.0 * jnp.sum(positives * keep)) / count
  num_anomalous = total(jnp.sum(labels * keep))
  has_both = (num_anomalous > 0) & (num_anomalous < total(jnp.sum(keep)))
  return jnp.where(has_both, loss, 0.0)
