"""Exact blocked nearest-neighbour search and the greedy k-centre coreset (PatchCore).

Both are compiled loops whose memory is bounded by block sizes, not by the bank: a bank of a
million 1024-d vectors is scored block by block, and the coreset loop only keeps one (N,)
vector of distances next to the (projected) features.

Squared distances are |q|^2 - 2 q.b + |b|^2 (one matmul per block, as faiss's `IndexFlatL2`
computes them). On CPUs with bfloat16 matrix instructions (AMX, AVX512-BF16) the search is
screened: XLA:CPU runs bfloat16 x bfloat16 -> float32 products there at 4-6 times its float32
rate (see adjax/models/matmul.py), so a bfloat16 pass picks a few candidates per query, those
are re-ranked exactly in float32, and a proven error bound of the bfloat16 scores decides
whether any other bank row could be nearer. Queries it cannot vouch for (neighbours closer
together than the bound) are searched again with a three-term bfloat16 split (float32-like
accuracy, still faster than float32 on these CPUs), and any left after that by the float32
search: the answer is always the exact one (up to float32 rounding of near-ties).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adjax.kernels import native
from adjax.methods.common import HIGHEST

_NT = (((1,), (1,)), ((), ()))   # a (M, K) x b (N, K)^T: the form XLA:CPU gives to YNNPACK
# Screened-search tiles (queries x bank rows): a (512, 4096) float32 score tile is 8 MB, and
# XLA:CPU's bfloat16 products ran at 700-800 GFLOP/s on 2 cores from (256, 2048) to (1024,
# 4096), against 280-470 at (512-2048, 16384) (benchmarks/bench_knn.py's machine).
_SCREEN_QUERY_BLOCK = 512
_SCREEN_BANK_BLOCK = 4096
_SCREEN_EXTRA = 3       # candidates re-ranked per query beyond k
_U_BF16 = 2.0 ** -8     # unit roundoff of bfloat16 (8-bit significand)
_U_F32 = 2.0 ** -24


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
  pad = (-x.shape[0]) % multiple
  return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _check(queries, bank, k: int) -> None:
  if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
    raise ValueError(f"queries (Q, D) and bank (B, D) must share D, got {queries.shape} and "
                     f"{bank.shape}")
  if bank.shape[0] < k:
    raise ValueError(f"bank has {bank.shape[0]} rows, fewer than k={k}")


def nearest_neighbours(queries: jax.Array, bank: jax.Array, *, k: int = 1,
                       query_block: int = 1024,
                       bank_block: int = 16384) -> tuple[jax.Array, jax.Array]:
  """Exact k nearest bank rows of every query (squared L2), blocked.

  Peak extra memory is about query_block x bank_block floats (plus a bfloat16 copy of one
  bank block where the search is screened, see the module docstring); the bank is scanned
  bank_block rows at a time, keeping a running top-k per query. The result is the exact
  search's (indices as a float64 brute force gives them, except between neighbours whose
  distances tie to float32 rounding), whichever way it was computed.

  Args:
    queries: (Q, D).
    bank: (B, D), B >= k.
    k: neighbours per query.
    query_block: queries per block.
    bank_block: bank rows per block.

  Returns:
    (distances (Q, k) float32 ascending, indices (Q, k) int32).
  """
  _check(queries, bank, k)
  traced = isinstance(queries, jax.core.Tracer) or isinstance(bank, jax.core.Tracer)
  # Inside a trace (an exported scoring program) the screen's fallback, which picks the
  # queries to redo on the host, cannot run: the exact float32 search alone gives the same.
  if traced or not _screening_pays(queries, bank):
    return _exact_search(queries, bank, k=k, query_block=query_block, bank_block=bank_block)
  blocks = dict(query_block=min(query_block, _SCREEN_QUERY_BLOCK),
                bank_block=min(bank_block, _SCREEN_BANK_BLOCK))
  dist, idx, ok = _screened_search(queries, bank, k=k, passes=1, **blocks)
  ok = np.array(ok)   # writable
  # Queries the bfloat16 pass could not vouch for: the three-term split, then float32.
  for passes in (3, 0):
    if ok.all():
      break
    miss = np.flatnonzero(~ok)
    # Padded to a power of two so that few shapes are ever compiled.
    rows = np.pad(miss, (0, max(16, 1 << (len(miss) - 1).bit_length()) - len(miss)), mode="edge")
    sub = jnp.asarray(queries)[rows]
    if passes:
      d_sub, i_sub, ok_sub = _screened_search(sub, bank, k=k, passes=passes, **blocks)
      ok[miss] = np.asarray(ok_sub)[:len(miss)]
    else:
      d_sub, i_sub = _exact_search(sub, bank, k=k, query_block=query_block,
                                   bank_block=bank_block)
      ok[miss] = True
    dist = dist.at[miss].set(d_sub[:len(miss)])
    idx = idx.at[miss].set(i_sub[:len(miss)])
  return dist, idx


def _screening_pays(queries, bank) -> bool:
  """Screen on CPUs whose bfloat16 products are fast; under a trace (the host decides which
  queries to search again) and elsewhere the float32 search runs."""
  if isinstance(queries, jax.core.Tracer) or isinstance(bank, jax.core.Tracer):
    return False
  if jax.default_backend() != "cpu" or min(queries.shape[0], bank.shape[0]) == 0:
    return False
  flags = native.cpu_flags()
  return "amx_bf16" in flags or "avx512_bf16" in flags


@functools.partial(jax.jit, static_argnames=("k", "query_block", "bank_block"))
def _exact_search(queries: jax.Array, bank: jax.Array, *, k: int, query_block: int,
                  bank_block: int) -> tuple[jax.Array, jax.Array]:
  """The float32 search: queries query_block at a time (lax.map), each against the bank
  bank_block rows at a time, keeping a running top-k."""
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


def _screen_operand(x: jax.Array, passes: int, *, bank: bool) -> jax.Array:
  """The bfloat16 operand of a screening product, (N, passes x D): bf16(x) (passes 1), or for
  the three-term split q.b ~ hi.HI + hi.LO + lo.HI, [hi, hi, lo] of queries and [HI, LO, HI]
  of bank rows, where hi = bf16(x) and lo = bf16(x - hi) (x - hi is exact in float32)."""
  hi = x.astype(jnp.bfloat16)
  if passes == 1:
    return hi
  lo = (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)
  return jnp.concatenate([hi, lo, hi] if bank else [hi, hi, lo], axis=1)


def _screen_scores(q_op: jax.Array, b_op: jax.Array, b_sq: jax.Array) -> jax.Array:
  """s~ = |b|^2 - 2 q~.b~ (Q, B) float32: the squared distance less |q|^2, from bfloat16
  operands, accumulated in float32 (the form XLA:CPU runs on the matrix units)."""
  return b_sq[None, :] - 2.0 * lax.dot_general(q_op, b_op, _NT,
                                                 preferred_element_type=jnp.float32)


def _score_error_bound(passes: int, dim: int, q_norm: jax.Array, b_norm_max: jax.Array,
                      q_sq: jax.Array) -> jax.Array:
  """A bound on |s~ - s| + (rounding of |q|^2), where s = |b|^2 - 2 q.b and s~ is the screening
  score |b|^2 - 2 q~.b~ computed in float32 from bfloat16 operands (`passes` 1: q~ = bf16(q);
  3: the split q.b ~ hi.HI + hi.LO + lo.HI), for any bank row b with |b| <= b_norm_max.

  Per coordinate the bfloat16 forms miss q_i b_i by at most rep |q_i b_i| (rounding to 8
  significant bits: 2u + u^2 for one term; u^2 (3 + 6u + 4u^2) for the split, u = 2^-8); the
  float32 sum of passes x dim exact bfloat16 products errs by at most gamma (their absolute
  sum), taking 2^-23 per addition so that round-to-odd or truncating accumulators (matrix
  units) are covered; Cauchy-Schwarz turns sum |q_i b_i| into |q| |b|. The float32 norms err
  by gamma |x|^2 and the final subtraction by 2^-24 of its operands; rounding q and b after
  centring them moves |q - b|^2 by at most 2^-23 (|q| + |b|)^2 (norms of the centred vectors).
  """
  u = _U_BF16
  rep = 2 * u + u * u if passes == 1 else u * u * (3 + 6 * u + 4 * u * u)
  mag = (1 + u) ** 2 if passes == 1 else (1 + u) ** 2 * (1 + 2 * u)
  n = passes * dim
  gamma = n * 2 * _U_F32 / (1 - n * 2 * _U_F32)
  c_dot = rep + gamma * mag
  qb = q_norm * b_norm_max
  bound = (2 * c_dot * qb + gamma * (b_norm_max ** 2 + q_sq)
           + 2 * _U_F32 * (b_norm_max ** 2 + 2 * qb)
           + 4 * _U_F32 * (q_norm + b_norm_max) ** 2)
  # 1 % for the float32 evaluation of this and of the test it enters; an absolute term for
  # flushed subnormal products.
  return 1.01 * bound + n * 2.0 ** -100


@functools.partial(jax.jit, static_argnames=("k", "passes", "query_block", "bank_block"))
def _screened_search(queries: jax.Array, bank: jax.Array, *, k: int, passes: int,
                     query_block: int, bank_block: int):
  """Screened exact search: (distances (Q, k), indices (Q, k), verified (Q,) bool).

  Queries and bank are first centred on the bank's mean (distances do not change, norms and
  with them the error bound shrink: features after a ReLU share a large mean). A bfloat16 pass
  (`passes` 1, or 3 for the split) scores s~ = |b|^2 - 2 q~.b~, keeping per bank block the
  k + 1 lowest (two near rows in one block both stay) and per query the k + _SCREEN_EXTRA
  lowest overall, with the lowest score of any row not kept; the kept rows are re-ranked by
  float32 sum((q - b)^2). A query is verified when every row not kept is provably farther
  (its score minus _score_error_bound) than the k-th re-ranked one: then the exact k nearest
  are among the kept rows.
  """
  q_n, dim = queries.shape
  b_n = bank.shape[0]
  keep = k + _SCREEN_EXTRA
  qf = queries.astype(jnp.float32)
  bf = bank.astype(jnp.float32)
  mean = jnp.mean(bf, axis=0)
  qc = qf - mean
  q_sq = jnp.sum(qc * qc, axis=1)
  b_sq = jnp.sum(jnp.square(bf - mean), axis=1)
  q_op = _screen_operand(qc, passes, bank=False)
  query_block, bank_block = min(query_block, q_n), min(bank_block, b_n)
  q_blocks = _pad_rows(q_op, query_block).reshape(-1, query_block, q_op.shape[1])
  nq = q_blocks.shape[0]
  bank_p = _pad_rows(bf, bank_block)
  b_sq_p = jnp.pad(b_sq, (0, bank_p.shape[0] - b_n), constant_values=jnp.inf)
  nb = bank_p.shape[0] // bank_block
  offsets = jnp.arange(nb, dtype=jnp.int32) * bank_block

  def bank_step(state, blk):
    rows, rows_sq, off = blk
    b_op = _screen_operand(rows - mean, passes, bank=True)

    def query_step(args):
      qo, kept_s, kept_i, rest = args
      s = _screen_scores(qo, b_op, rows_sq)
      cols = lax.broadcasted_iota(jnp.int32, s.shape, 1)
      new_s, new_i = [], []
      # k + 1 passes of min / first index of the min / mask: reductions XLA vectorises.
      for _ in range(min(k + 1, keep)):
        m = jnp.min(s, axis=1)
        j = jnp.min(jnp.where(s == m[:, None], cols, bank_block - 1), axis=1)
        new_s.append(m)
        new_i.append(j + off)
        s = jnp.where(cols == j[:, None], jnp.inf, s)
      all_s = jnp.concatenate([kept_s, jnp.stack(new_s, 1)], axis=1)
      all_i = jnp.concatenate([kept_i, jnp.stack(new_i, 1)], axis=1)
      neg, sel = lax.top_k(-all_s, keep + 1)
      # Rows dropped now (from the block or from the kept set) join the rest.
      rest = jnp.minimum(rest, jnp.minimum(jnp.min(s, axis=1), -neg[:, keep]))
      return -neg[:, :keep], jnp.take_along_axis(all_i, sel[:, :keep], axis=1), rest

    return lax.map(query_step, (q_blocks, *state)), None

  init = (jnp.full((nq, query_block, keep), jnp.inf, jnp.float32),
          jnp.zeros((nq, query_block, keep), jnp.int32),
          jnp.full((nq, query_block), jnp.inf, jnp.float32))
  blocks = (bank_p.reshape(nb, bank_block, dim), b_sq_p.reshape(nb, bank_block), offsets)
  (kept_s, kept_i, rest), _ = lax.scan(bank_step, init, blocks)

  b_norm_max = jnp.sqrt(jnp.max(b_sq) * (1 + 4 * dim * _U_F32))
  qf_blocks = _pad_rows(qf, query_block).reshape(nq, query_block, dim)
  q_sq_blocks = jnp.pad(q_sq, (0, nq * query_block - q_n)).reshape(nq, query_block)

  def rerank(args):
    qb, qsq, ks, ki, rest = args
    diff = qb[:, None, :] - bf[ki]
    d = jnp.where(jnp.isinf(ks), jnp.inf, jnp.sum(diff * diff, axis=-1))
    neg, sel = lax.top_k(-d, k)
    dk, ik = -neg, jnp.take_along_axis(ki, sel, axis=1)
    q_norm = jnp.sqrt(qsq * (1 + 4 * dim * _U_F32))
    margin = _score_error_bound(passes, dim, q_norm, b_norm_max, qsq)
    # The k-th re-ranked distance may itself be low by its float32 rounding (gamma_dim).
    ok = qsq + rest - margin > dk[:, -1] * (1 + 4 * dim * _U_F32)
    return dk, ik, ok

  dk, ik, ok = lax.map(rerank, (qf_blocks, q_sq_blocks, kept_s, kept_i, rest))
  return (dk.reshape(-1, k)[:q_n], ik.reshape(-1, k)[:q_n], ok.reshape(-1)[:q_n])


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
