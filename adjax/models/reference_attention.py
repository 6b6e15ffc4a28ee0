"""Multi-head attention of image tokens over the projector's reference tokens.

softmax(q k^T) v per head, for q (H, T, d) and keys/values (H, R, d) shared by the whole batch
(R = 2048 reference tokens, d = 48 in the paper). Two implementations of the same math:

* "dense": one batched matmul per product, the whole (H, T, R) weight tensor in memory. Right
  for GPUs and TPUs, whose batched matmuls are fast and whose compilers fuse the softmax.
* "blocked": per head, per block of queries, with a custom VJP that keeps only the output and
  the per-query log-sum-exp and recomputes the weights of a block in the backward pass (the
  flash-attention scheme; keys are few enough, 2048, that a block sees all of them at once, so
  no running maximum is needed). On CPUs this is 2-3x faster than "dense": XLA:CPU runs batched
  matmuls with a 48-wide contraction almost single-threaded and the dense form streams the
  (H, T, R) tensor (268 MB per level at batch 4) through memory about ten times; here every
  matmul is a plain 2-D one that Eigen spreads over all cores, on blocks that stay in cache.

* "fused-cpu": the blocked scheme as a native kernel (adjax/kernels/reference_attention_cpu.cc,
  AVX-512, through XLA's FFI): per block of 64 queries the logits, exponentials and products
  run in one pass over data in cache, and the keys and values are packed once per head into
  panels that the 48-long contractions read contiguously. About 1.4x the blocked form's speed
  on this project's CPUs (forward + backward of one level). d of 16, 32, 48 or 64; computes in
  float32 (float16 operands, and bfloat16 ones on CPUs without AMX, are widened, the output
  rounded back). bfloat16 operands on CPUs with AMX (and Linux's permission for its tiles) go to
  the kernel's AMX handlers instead: every product on the tile unit in bfloat16 with float32
  accumulation, the softmax and its gradient in float32, the weights and logit gradients
  rounded to bfloat16 before their products (PyTorch's bfloat16 autocast does the same).

"auto" picks "fused-cpu" on a single CPU device where the kernel is available (x86-64 with
AVX-512, a C++ compiler, a supported d; see adjax.kernels.native), else "blocked" on a
single CPU device, and "dense" elsewhere: on GPUs and TPUs, and on several CPU devices, where
XLA partitions the dense form's batched matmuls over the batch but would gather the blocked
loops' tokens onto every device (measured: 3x slower than one device on 8 virtual CPU devices).
All return the same values and gradients (tested against each other and against a plain
softmax).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from adjax.kernels import native

Array = jax.Array

DEFAULT_QUERY_BLOCK = 256
IMPLEMENTATIONS = ("auto", "blocked", "dense", "fused-cpu")
FUSED_CPU_HEAD_DIMS = (16, 32, 48, 64)
FUSED_CPU_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)   # widened to float32 in the kernel
_FUSED_CPU_ROWS = 8   # the kernel takes queries in multiples of 8
_FUSED_AMX_ROWS = 32  # its AMX handlers, in multiples of 32


def dense_attention(q: Array, k: Array, v: Array) -> Array:
  """softmax(q k^T) v with (H, T, d) queries and (H, R, d) keys/values; softmax in float32."""
  logits = jnp.einsum("htd,hrd->htr", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("htr,hrd->htd", weights, v)


def _query_blocks(x: Array, block: int) -> Array:
  """(H, T, ...) -> (H, T / block, block, ...)."""
  return x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:])


def _transposed_query_blocks(x: Array, block: int) -> Array:
  """(H, T, d) -> (H, T / block, d, block)."""
  return jnp.swapaxes(_query_blocks(x, block), 2, 3)


def _dot_first_transposed(a_t: Array, b: Array) -> Array:
  """a_t^T @ b in float32, for a_t given as (K, M).

  Why: with the contraction on the first axis of both operands XLA:CPU (jax 0.10.2) runs
  the product through its Eigen matmul, which is faster for these (block, R) products with a
  48-wide contraction than the YNNPACK kernel it uses for the plain (M, K) @ (K, N) form
  (attention forward + backward of one level: ~10 % less time, measured).
  """
  return jax.lax.dot_general(a_t, b, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _blocked_forward(q: Array, k: Array, v: Array, block: int) -> tuple[Array, Array]:
  """Output (H, T, d) and per-query log-sum-exp of the logits (H, T), float32."""

  def head(args):
    q_t_h, k_h, v_h = args
    keys_t = k_h.T                                                     # (d, R), once per head

    def query_block(q_t_b):
      logits = _dot_first_transposed(q_t_b, keys_t)                    # (block, R)
      row_max = jnp.max(logits, axis=-1, keepdims=True)
      unnormalised = jnp.exp(logits - row_max)
      total = jnp.sum(unnormalised, axis=-1, keepdims=True)
      # Normalising the (block, d) output is cheaper than the (block, R) weights.
      out = jnp.dot(unnormalised.astype(v_h.dtype), v_h,
                    preferred_element_type=jnp.float32) / total
      return out.astype(q.dtype), (row_max + jnp.log(total))[:, 0]

    return jax.lax.map(query_block, q_t_h)

  out, lse = jax.lax.map(head, (_transposed_query_blocks(q, block), k, v))
  h, t, d = q.shape
  return out.reshape(h, t, d), lse.reshape(h, t)


def _blocked_backward(q: Array, k: Array, v: Array, out: Array, lse: Array, d_out: Array,
                      block: int) -> tuple[Array, Array, Array]:
  """Gradients for q, k, v, recomputing each block's softmax weights from its log-sum-exp."""
  # Softmax backward: dlogits = w * (dw - sum_r w dw), and sum_r w dw = <d_out, out> per query.
  row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

  def head(args):
    q_h, q_t_h, d_out_h, d_out_t_h, lse_h, row_dot_h, k_h, v_h = args
    keys_t, values_t = k_h.T, v_h.T                                    # (d, R)

    def query_block(carry, blocks):
      d_keys_t, d_values_t = carry
      q_b, q_t_b, d_out_b, d_out_t_b, lse_b, row_dot_b = blocks
      weights = jnp.exp(_dot_first_transposed(q_t_b, keys_t) - lse_b[:, None])   # (block, R)
      d_weights = _dot_first_transposed(d_out_t_b, values_t)
      d_logits = (weights * (d_weights - row_dot_b[:, None])).astype(q.dtype)
      d_q = jnp.dot(d_logits, k_h, preferred_element_type=jnp.float32).astype(q.dtype)
      # (d, block) @ (block, R): the transposed accumulators keep R as the long output axis.
      d_keys_t = d_keys_t + _dot_first_transposed(q_b, d_logits)
      d_values_t = d_values_t + _dot_first_transposed(d_out_b, weights.astype(d_out_b.dtype))
      return (d_keys_t, d_values_t), d_q

    zeros = jnp.zeros(keys_t.shape, jnp.float32)
    (d_keys_t, d_values_t), d_q = jax.lax.scan(
        query_block, (zeros, zeros), (q_h, q_t_h, d_out_h, d_out_t_h, lse_h, row_dot_h))
    return d_q, d_keys_t.T.astype(k.dtype), d_values_t.T.astype(v.dtype)

  blocks = lambda x: _query_blocks(x, block)
  transposed = lambda x: _transposed_query_blocks(x, block)
  d_q, d_k, d_v = jax.lax.map(head, (blocks(q), transposed(q), blocks(d_out), transposed(d_out),
                                     blocks(lse), blocks(row_dot), k, v))
  return d_q.reshape(q.shape), d_k, d_v


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(q: Array, k: Array, v: Array, block: int) -> Array:
  return _blocked_forward(q, k, v, block)[0]


def _blocked_fwd(q, k, v, block):
  out, lse = _blocked_forward(q, k, v, block)
  return out, (q, k, v, out, lse)


def _blocked_bwd(block, residuals, d_out):
  return _blocked_backward(*residuals, d_out, block)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(q: Array, k: Array, v: Array,
                      query_block: int = DEFAULT_QUERY_BLOCK) -> Array:
  """The "blocked" implementation; T need not be a multiple of query_block (padded)."""
  t = q.shape[1]
  block = max(1, min(query_block, t))
  padded = math.ceil(t / block) * block
  if padded != t:
    # Zero query rows give finite outputs that are sliced off; their output cotangent is
    # zero, so they add nothing to the key and value gradients.
    q = jnp.pad(q, ((0, 0), (0, padded - t), (0, 0)))
  return _blocked(q, k, v, block)[:, :t]


def _kernel_attention(forward: str, backward: str,
                      dtype) -> Callable[[Array, Array, Array], Array]:
  """softmax(q k^T) v with a custom VJP through a forward/backward pair of the native kernel's
  FFI handlers (names as in native.TARGETS), which take and return `dtype` arrays (the
  per-query log-sum-exp that the forward keeps for the backward is float32)."""

  def forward_call(q, k, v):
    h, t, _ = q.shape
    return jax.ffi.ffi_call(
        native.TARGETS[forward],
        (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((h, t), jnp.float32)),
        vmap_method="sequential")(q, k, v)

  @jax.custom_vjp
  def attention(q, k, v):
    return forward_call(q, k, v)[0]

  def attention_fwd(q, k, v):
    out, lse = forward_call(q, k, v)
    return out, (q, k, v, out, lse)

  def attention_bwd(residuals, d_out):
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, dtype) for x in residuals[:3])
    return jax.ffi.ffi_call(native.TARGETS[backward], shapes,
                            vmap_method="sequential")(*residuals, d_out.astype(dtype))

  attention.defvjp(attention_fwd, attention_bwd)
  return attention


_fused_cpu = _kernel_attention("AdjaxReferenceAttentionForward",
                               "AdjaxReferenceAttentionBackward", jnp.float32)
_fused_amx = _kernel_attention("AdjaxReferenceAttentionForwardAmx",
                               "AdjaxReferenceAttentionBackwardAmx", jnp.bfloat16)


def fused_cpu_supported(q: Array, k: Array, v: Array) -> bool:
  """Whether "fused-cpu" can take these operands here (dtype, head width, kernel built)."""
  return (all(x.dtype in FUSED_CPU_DTYPES for x in (q, k, v))
          and q.shape[-1] in FUSED_CPU_HEAD_DIMS and native.available())


def fused_cpu_attention(q: Array, k: Array, v: Array) -> Array:
  """The "fused-cpu" implementation; T need not be a multiple of 8 (or 32 on AMX; padded).

  bfloat16 q, k, v on a CPU with AMX (adjax.kernels.native.amx_available): the AMX handlers,
  products in bfloat16 with float32 accumulation. Otherwise the kernel computes in float32:
  bfloat16 or float16 operands are widened on the way in (exactly) and the output rounded to
  q's dtype on the way out (AVX512-BF16 pair products were measured no faster than float32
  FMAs), the blocked form's accuracy or better at the kernel's speed.
  """
  if not fused_cpu_supported(q, k, v):
    raise ValueError(
        f"implementation='fused-cpu' needs float32, bfloat16 or float16 q, k, v with d in "
        f"{FUSED_CPU_HEAD_DIMS} and the native kernel built (got {q.dtype}, {k.dtype}, "
        f"{v.dtype}, d={q.shape[-1]}, kernel available: {native.available()}; see "
        "adjax.kernels.native)")
  return _fused_cpu_attention(q, k, v)


def _fused_cpu_attention(q: Array, k: Array, v: Array) -> Array:
  """fused_cpu_attention for operands already known to be supported."""
  t = q.shape[1]
  amx = all(x.dtype == jnp.bfloat16 for x in (q, k, v)) and native.amx_available()
  rows = _FUSED_AMX_ROWS if amx else _FUSED_CPU_ROWS
  padded = math.ceil(t / rows) * rows
  if padded != t:   # zero query rows, sliced off: they add nothing to the key/value gradients
    q = jnp.pad(q, ((0, 0), (0, padded - t), (0, 0)))
  if amx:
    return _fused_amx(q, k, v)[:, :t]
  wide = [x.astype(jnp.float32) for x in (q, k, v)]
  return _fused_cpu(*wide)[:, :t].astype(q.dtype)


def reference_attention(q: Array, k: Array, v: Array, *, implementation: str = "auto",
                        query_block: int = DEFAULT_QUERY_BLOCK) -> Array:
  """softmax(q k^T) v per head (the caller scales q).

  Args:
    q: (H, T, d) queries; k, v: (H, R, d) keys and values.
    implementation: "auto" (fused-cpu, else blocked, on a single CPU device; dense
      elsewhere), "blocked", "dense" or "fused-cpu".
    query_block: queries per block of the blocked implementation.

  Returns:
    (H, T, d) in q's dtype.
  """
  if q.ndim != 3 or k.shape != v.shape or q.shape[::2] != k.shape[::2]:
    raise ValueError(f"expected q (H, T, d) and k, v (H, R, d); got q {q.shape}, k {k.shape}, "
                     f"v {v.shape}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; expected one of {IMPLEMENTATIONS}")
  if implementation == "auto":
    single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    if not single_cpu:
      implementation = "dense"
    elif fused_cpu_supported(q, k, v):
      return _fused_cpu_attention(q, k, v)   # checked just now
    else:
      implementation = "blocked"
  if implementation == "fused-cpu":
    return fused_cpu_attention(q, k, v)
  if implementation == "dense":
    return dense_attention(q, k, v).astype(q.dtype)
  return blocked_attention(q, k, v, query_block)
