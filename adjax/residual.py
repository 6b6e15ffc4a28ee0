"""Residual features (docs/method.md section 2): each token minus its nearest normal reference
feature.

The nearest reference is the one with the largest cosine similarity (ties: the lowest index).
References are either shared by the whole batch, (N, C), as in evaluation where a class has one
reference set, or per image, (B, N, C) with a validity mask, as in pretraining where every image
has references of its own class and view and a varying number of shots.

Similarities are computed in blocks of references (and, for very large inputs, of queries) with a
running maximum, so that at most `max_similarities` entries exist at once.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_MAX_SIMILARITIES = 1 << 25  # 32M float32 entries: 128 MiB


def _normalize(x: Array) -> Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
  return (x / jnp.maximum(norm, 1e-12)).astype(x.dtype)


def _block_sizes(batch: int, queries: int, refs: int, max_similarities: int) -> tuple[int, int]:
  """(query_block, ref_block) with batch * query_block * ref_block <= max_similarities."""
  if batch * queries * refs <= max_similarities:
    return queries, refs
  ref_block = min(refs, 2048)
  query_block = max(1, max_similarities // (batch * ref_block))
  if query_block >= queries:
    return queries, max(1, min(refs, max_similarities // (batch * queries)))
  return query_block, ref_block


def _pad_to(x: Array, multiple: int, axis: int, value: Any = 0) -> Array:
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.jit, static_argnames=("query_block", "ref_block", "compute_dtype"))
def _nearest_index(queries: Array, refs: Array, valid: Array, *, query_block: int,
                   ref_block: int, compute_dtype: Any) -> Array:
  """queries (B, Q, C), refs (B, N, C), valid (B, N) -> (B, Q) index of the best valid ref."""
  b, q, _ = queries.shape
  n = refs.shape[1]
  qn = _pad_to(_normalize(queries).astype(compute_dtype), query_block, axis=1)
  rn = _pad_to(_normalize(refs).astype(compute_dtype), ref_block, axis=1)
  valid = _pad_to(valid, ref_block, axis=1, value=False)
  ref_blocks = (jnp.moveaxis(rn.reshape(b, -1, ref_block, rn.shape[-1]), 1, 0),
                jnp.moveaxis(valid.reshape(b, -1, ref_block), 1, 0),
                jnp.arange(rn.shape[1] // ref_block) * ref_block)

  def search(query_chunk):  # (B, query_block, C) -> (B, query_block)
    def step(carry, block):
      best_sim, best_idx = carry
      refs_block, valid_block, offset = block
      sims = jnp.einsum("bqc,bnc->bqn", query_chunk, refs_block,
                        preferred_element_type=jnp.float32)
      sims = jnp.where(valid_block[:, None, :], sims, -jnp.inf)
      block_sim = jnp.max(sims, axis=-1)
      block_idx = jnp.argmax(sims, axis=-1).astype(jnp.int32) + offset
      better = block_sim > best_sim  # strict: an earlier block wins ties (lowest index)
      return (jnp.where(better, block_sim, best_sim), jnp.where(better, block_idx, best_idx)), None

    init = (jnp.full(query_chunk.shape[:2], -jnp.inf, jnp.float32),
            jnp.zeros(query_chunk.shape[:2], jnp.int32))
    (_, best_idx), _ = jax.lax.scan(step, init, ref_blocks)
    return best_idx

  chunks = jnp.moveaxis(qn.reshape(b, -1, query_block, qn.shape[-1]), 1, 0)
  index = jax.lax.map(search, chunks)                       # (chunks, B, query_block)
  index = jnp.moveaxis(index, 0, 1).reshape(b, -1)[:, :q]
  return jnp.minimum(index, n - 1)


def residual_features(features: Array, refs: Array, ref_valid: Optional[Array] = None, *,
                      max_similarities: int = DEFAULT_MAX_SIMILARITIES,
                      compute_dtype: Any = jnp.float32) -> tuple[Array, Array]:
  """Subtracts from every token its nearest reference feature by cosine similarity.

  Args:
    features: (B, H, W, C) token features of one level.
    refs: (N, C) references shared by the batch, or (B, N, C) per image.
    ref_valid: optional (N,) or (B, N) bool; invalid rows are never matched (unused shots).
      Every image needs at least one valid reference.
    max_similarities: cap on the similarity entries held at once.
    compute_dtype: dtype of the similarity matmul (bfloat16 is faster on accelerators but may
      break near-ties differently).

  Returns:
    (residual (B, H, W, C) in the features' dtype, index (B, H, W) int32 of the matched row).
  """
  if features.ndim != 4:
    raise ValueError(f"features must be (B, H, W, C), got shape {tuple(features.shape)}")
  b, h, w, c = features.shape
  if refs.ndim not in (2, 3) or refs.shape[-1] != c:
    raise ValueError(f"refs must be (N, {c}) or (B, N, {c}), got shape {tuple(refs.shape)}")
  shared = refs.ndim == 2
  n = refs.shape[-2]
  if ref_valid is None:
    ref_valid = jnp.ones(refs.shape[:-1], bool)
  ref_valid = jnp.asarray(ref_valid, bool)
  if ref_valid.shape != refs.shape[:-1]:
    raise ValueError(f"ref_valid must have shape {tuple(refs.shape[:-1])}, "
                     f"got {tuple(ref_valid.shape)}")
  if shared:  # all B * H * W tokens query the same references
    queries, batch_refs, batch_valid = (features.reshape(1, b * h * w, c), refs[None],
                                        ref_valid[None])
  else:
    if refs.shape[0] != b:
      raise ValueError(f"per-image refs must have {b} rows on axis 0, got {refs.shape[0]}")
    queries, batch_refs, batch_valid = features.reshape(b, h * w, c), refs, ref_valid
  query_block, ref_block = _block_sizes(*queries.shape[:2], n, max_similarities)
  index = _nearest_index(queries, batch_refs, batch_valid, query_block=query_block,
                         ref_block=ref_block, compute_dtype=compute_dtype)
  matched = jnp.take_along_axis(batch_refs, index[..., None], axis=1)
  residual = features - matched.reshape(features.shape).astype(features.dtype)
  return residual, index.reshape(b, h, w)
