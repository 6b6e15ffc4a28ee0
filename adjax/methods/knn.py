"""Exact blocked nearest-neighbour search and the greedy k-centre coreset (PatchCore).

Both are compiled loops whose memory is bounded by block sizes, not by the bank: a bank of a
million 1024-d vectors is scored block by block, and the coreset loop only keeps one (N,)
vector of distances next to the (projected) features.

Squared distances are computed as |q|^2 - 2 q.b + |b|^2 (one matmul per block, as faiss's
`IndexFlatL2` does) and clamped at 0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from adjax.methods.common import HIGHEST


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
  pad = (-x.shape[0]) % multiple
  return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


@functools.partial(jax.jit, static_argnames=("k", "query_block", "bank_block"))
def nearest_neighbours(queries: jax.Array, bank: jax.Array, *, k: int = 1,
                       query_block: int = 1024,
                       bank_block: int = 16384) -> tuple[jax.Array, jax.Array]:
  """Exact k nearest bank rows of every query (squared L2), blocked.

  Peak extra memory is about query_block x bank_block floats; queries are processed
  query_block at a time (lax.map), and for each the bank is scanned bank_block rows at a time,
  keeping a running top-k.

  Args:
    queries: (Q, D).
    bank: (B, D), B >= k.
    k: neighbours per query.
    query_block: queries per block.
    bank_block: bank rows per block.

  Returns:
    (distances (Q, k) float32 ascending, indices (Q, k) int32).
  """
  if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
    raise ValueError(f"queries (Q, D) and bank (B, D) must share D, got {queries.shape} and "
                     f"{bank.shape}")
  if bank.shape[0] < k:
    raise ValueError(f"bank has {bank.shape[0]} rows, fewer than k={k}")
  q_n, b_n = queries.shape[0], bank.shape[0]
  bank_block = min(bank_block, b_n)
  query_block = min(query_block, q_n)
  queries = queries.astype(jnp.float32)
  bank = bank.astype(jnp.float32)
  b_sq = jnp.sum(bank * bank, axis=1)
  bank_p = _pad_rows(bank, bank_block)
  # Padding rows get an infinite norm so they are never chosen.
  b_sq_p = jnp.pad(b_sq, (0, bank_p.shape[0] - b_n), constant_values=jnp.inf)
  nb = bank_p.shape[0] // bank_block
  bank_blocks = bank_p.reshape(nb, bank_block, -1)
  sq_blocks = b_sq_p.reshape(nb, bank_block)
  offsets = jnp.arange(nb, dtype=jnp.int32) * bank_block

  def one_query_block(qb):
    q_sq = jnp.sum(qb * qb, axis=1, keepdims=True)
    init = (jnp.full((qb.shape[0], k), jnp.inf, jnp.float32),
            jnp.zeros((qb.shape[0], k), jnp.int32))

    def step(carry, blk):
      best_d, best_i = carry
      bb, bsq, off = blk
      d = q_sq - 2.0 * jnp.matmul(qb, bb.T, precision=HIGHEST) + bsq[None, :]
      if k == 1:
        j = jnp.argmin(d, axis=1)
        dj = jnp.take_along_axis(d, j[:, None], axis=1)
        better = dj < best_d
        return (jnp.where(better, dj, best_d),
                jnp.where(better, j[:, None].astype(jnp.int32) + off, best_i)), None
      neg, j = jax.lax.top_k(-d, k)
      all_d = jnp.concatenate([best_d, -neg], axis=1)
      all_i = jnp.concatenate([best_i, j.astype(jnp.int32) + off], axis=1)
      neg2, sel = jax.lax.top_k(-all_d, k)
      return (-neg2, jnp.take_along_axis(all_i, sel, axis=1)), None

    (best_d, best_i), _ = jax.lax.scan(step, init, (bank_blocks, sq_blocks, offsets))
    return jnp.maximum(best_d, 0.0), best_i

  qp = _pad_rows(queries, query_block)
  nq = qp.shape[0] // query_block
  d, i = jax.lax.map(one_query_block, qp.reshape(nq, query_block, -1))
  return d.reshape(-1, k)[:q_n], i.reshape(-1, k)[:q_n]


def _distances_to(x: jax.Array, x_sq: jax.Array, p: jax.Array) -> jax.Array:
  """Euclidean distance of every row of x to the rows of p: (N, P), as PatchCore computes it."""
  d = x_sq[:, None] - 2.0 * jnp.matmul(x, p.T, precision=HIGHEST) + jnp.sum(p * p, 1)[None]
  return jnp.sqrt(jnp.maximum(d, 0.0))


def random_projection(rng: jax.Array, dim_in: int, dim_out: int) -> jax.Array:
  """PatchCore's random linear map (torch.nn.Linear init, no bias): (dim_in, dim_out)."""
  bound = 1.0 / math.sqrt(dim_in)
  return jax.random.uniform(rng, (dim_in, dim_out), jnp.float32, -bound, bound)


@functools.partial(jax.jit, static_argnames=("num", "num_starts", "block_size"))
def greedy_coreset_from_starts(points: jax.Array, starts: jax.Array, *, num: int,
                               num_starts: int = 10,
                               block_size: int = 65536) -> jax.Array:
  """Greedy farthest-point (k-centre) selection from given start points.

  PatchCore's approximate greedy coreset: every point's initial distance is its mean
  Euclidean distance to the `starts` (which are not themselves selected); then `num` times,
  select the point with the largest distance and lower every distance to at most the distance
  to the selected point. The first distances are computed block_size points at a time; each
  loop step is one (N, D) x (D,) product.

  Args:
    points: (N, D) (already projected).
    starts: (num_starts,) int indices of the start points.
    num: number of points to select (<= N).
    num_starts: len(starts) (static).
    block_size: points per block of the start-distance computation.

  Returns:
    (num,) int32 indices, in selection order.
  """
  del num_starts
  n = points.shape[0]
  points = points.astype(jnp.float32)
  sq = jnp.sum(points * points, axis=1)
  start_pts = points[starts]
  bs = min(block_size, n)
  pp = _pad_rows(points, bs)
  sqp = jnp.pad(sq, (0, pp.shape[0] - n))
  init = jax.lax.map(lambda a: jnp.mean(_distances_to(a[0], a[1], start_pts), axis=1),
                     (pp.reshape(-1, bs, points.shape[1]), sqp.reshape(-1, bs)))
  min_d = init.reshape(-1)[:n]

  def body(i, carry):
    min_d, chosen = carry
    j = jnp.argmax(min_d).astype(jnp.int32)
    d = _distances_to(points, sq, points[j][None])[:, 0]
    return jnp.minimum(min_d, d), chosen.at[i].set(j)

  _, chosen = jax.lax.fori_loop(0, num, body, (min_d, jnp.zeros((num,), jnp.int32)))
  return chosen


def greedy_coreset(features: jax.Array, num: int, rng: jax.Array, *, projection_dim: int = 128,
                   num_starts: int = 10, block_size: int = 65536) -> jax.Array:
  """PatchCore's coreset: random projection to `projection_dim`, then greedy k-centre.

  Args:
    features: (N, D) memory-bank candidates.
    num: coreset size (1 <= num <= N).
    rng: PRNG key (projection and start points).
    projection_dim: dimension of the random projection (no projection when D <= it).
    num_starts: random start points (not selected themselves).
    block_size: points per block for the start distances.

  Returns:
    (num,) int32 indices into features.
  """
  n, d = features.shape
  if not 1 <= num <= n:
    raise ValueError(f"coreset size must be in [1, {n}], got {num}")
  k_proj, k_start = jax.random.split(rng)
  x = jnp.asarray(features, jnp.float32)
  if d > projection_dim:
    x = _project(x, random_projection(k_proj, d, projection_dim))
  starts = jax.random.choice(k_start, n, (min(num_starts, n),), replace=False)
  return greedy_coreset_from_starts(x, starts, num=num, num_starts=int(starts.shape[0]),
                                    block_size=block_size)


@jax.jit
def _project(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.matmul(x, w, precision=HIGHEST)
