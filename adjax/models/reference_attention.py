"""Multi-head attention of image tokens over the projector's reference tokens.

softmax(q k^T) v per head, for q (H, T, d) and keys/values (H, R, d) shared by the whole batch
(R = 2048 reference tokens, d = 48 in the paper; the caller scales q). One setting,
`projector.attention`, chooses the implementation; all return the same values and gradients
(tests/models/test_attention_impls.py checks each against a float64 softmax):

* "dense": one batched einsum per product, the whole float32 (H, T, R) logits in memory (XLA
  fuses the softmax). What TPUs run, and several CPU devices, where XLA partitions the batched
  matmuls over the tokens.
* "dot_product": `jax.nn.dot_product_attention`. On a GPU whose cuDNN takes the operands
  (float16/bfloat16, head width a multiple of 8 up to 128) its cuDNN fused (flash) attention,
  which never materialises the logits; elsewhere its XLA form, the dense math. (jax 0.10's
  `implementation=None` always means XLA, so the cuDNN form is asked for by name where a trial
  trace says cuDNN accepts these shapes.)
* "blocked": per head, per block of queries, with a custom VJP that keeps only the output and
  the per-query log-sum-exp and recomputes a block's weights in the backward pass (the
  flash-attention scheme; 2048 keys fit one block, so no running maximum is needed). On CPUs
  2-3x faster than "dense": XLA:CPU runs batched matmuls with a 48-wide contraction almost
  single-threaded and the dense form streams the (H, T, R) tensor (268 MB per level at batch
  4) through memory about ten times; here every matmul is a plain 2-D one that Eigen spreads
  over all cores, on blocks that stay in cache. On several devices XLA would gather the blocked
  loops' tokens onto every device (measured: 3x slower than one device on 8 CPU devices).
* "native_cpu": the blocked scheme as a native kernel (adjax/kernels/reference_attention_cpu.cc,
  AVX-512, through XLA's FFI; about 1.4x the blocked form's speed on this project's CPUs). d of
  16, 32, 48 or 64; computes in float32 (float16 operands, and bfloat16 ones on CPUs without
  AMX, are widened, the output rounded back); bfloat16 operands on CPUs with AMX (and Linux's
  permission for its tiles) go to the kernel's AMX handlers: products in bfloat16 with float32
  accumulation, softmax and its gradient in float32. Built, probed and imported only when asked
  for (adjax.kernels.native is not imported otherwise), and an error where it cannot run.
* "auto": "dot_product" on a GPU where cuDNN takes the operands, else "dense" there (the
  reason logged); "dense" on TPUs and on several CPU devices; "blocked" on one CPU device.

`resolve_attention` makes the choice (from the backend this process runs on and the device
count, nothing else), logs it once on the "adjax.attention" logger and returns it with its
reason, so that runs, exports and benchmarks can record it.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from adjax.errors import UserError

Array = jax.Array

log = logging.getLogger("adjax.attention")

DEFAULT_QUERY_BLOCK = 256
IMPLEMENTATIONS = ("auto", "dense", "dot_product", "blocked", "native_cpu")
NATIVE_CPU_HEAD_DIMS = (16, 32, 48, 64)
NATIVE_CPU_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)   # widened to float32 in the kernel
_NATIVE_CPU_ROWS = 8   # the kernel takes queries in multiples of 8
_NATIVE_AMX_ROWS = 32  # its AMX handlers, in multiples of 32


def resolve_attention(requested: str, *, num_heads: int, head_dim: int,
                      dtype: Any) -> tuple[str, str]:
  """The implementation that `requested` means here, and why.

  Args:
    requested: a `projector.attention` value (one of IMPLEMENTATIONS).
    num_heads, head_dim: the attention's heads and their width (C / num_heads).
    dtype: the dtype of q, k and v (the compute dtype).

  Returns:
    (name, reason): name is "dense", "dot_product", "blocked" or "native_cpu"; reason says why
    and, for "dot_product", whether cuDNN or XLA runs it. Logged once per distinct answer.

  Raises:
    UserError: an unknown name, or "native_cpu" where the kernel cannot run.
  """
  if requested not in IMPLEMENTATIONS:
    raise UserError(f"projector.attention (implementation) = {requested!r}; expected one of "
                    f"{IMPLEMENTATIONS}")
  dtype = jnp.dtype(dtype)
  backend, devices = jax.default_backend(), jax.device_count()
  if requested == "auto":
    name, reason = _auto(backend, devices, num_heads, head_dim, dtype)
  elif requested == "dot_product":
    refused = _cudnn_refusal(backend, num_heads, head_dim, dtype)
    name, reason = "dot_product", ("cuDNN fused attention" if refused is None
                                   else f"XLA's form ({refused})")
  elif requested == "native_cpu":
    name, reason = "native_cpu", _native_cpu_handlers(backend, head_dim, dtype)
  else:
    name, reason = requested, "as configured"
  _log_choice(requested, name, f"{reason}; {backend}, {devices} device(s), {num_heads} heads "
              f"of {head_dim}, {dtype.name}")
  return name, reason


def attention_record(requested: str, *, level_dims: Sequence[int], num_heads: int,
                     dtype: Any) -> dict[str, Any]:
  """What the projector's attention is on every level, for a run's or benchmark's metadata:
  {"requested": ..., "implementation": ..., "reason": ...} (several levels of different widths
  that resolve differently give their answers joined by " | ")."""
  answers = [resolve_attention(requested, num_heads=num_heads, head_dim=int(c) // num_heads,
                               dtype=dtype) for c in level_dims]
  distinct = list(dict.fromkeys(answers))
  return {"requested": requested, "implementation": " | ".join(n for n, _ in distinct),
          "reason": " | ".join(r for _, r in distinct)}


def _auto(backend: str, devices: int, num_heads: int, head_dim: int,
          dtype: Any) -> tuple[str, str]:
  if backend == "gpu":
    refused = _cudnn_refusal(backend, num_heads, head_dim, dtype)
    if refused is None:
      return "dot_product", "GPU: cuDNN fused attention"
    return "dense", f"GPU, but cuDNN fused attention refuses these operands ({refused})"
  if backend == "cpu" and devices == 1:
    return "blocked", "one CPU device: blocked queries, recomputing backward"
  if backend == "cpu":
    return "dense", "several CPU devices: XLA partitions the dense form over the tokens"
  return "dense", f"{backend}: XLA's batched matmuls"


@functools.cache
def _cudnn_refusal(backend: str, num_heads: int, head_dim: int, dtype: Any) -> str | None:
  """Why cuDNN's fused attention cannot take these operands here (None: it can).

  On a GPU a trial trace (abstract shapes, nothing compiled) of the cuDNN form's forward and
  backward runs jax's own checks: the cuDNN library, its version, the device, dtype and head
  width."""
  if backend != "gpu":
    return f"cuDNN runs on GPUs only, this is {backend}"
  query = jax.ShapeDtypeStruct((1, 64, num_heads, head_dim), dtype)
  keys = jax.ShapeDtypeStruct((1, 128, num_heads, head_dim), dtype)

  def loss(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation="cudnn")
    return jnp.sum(out.astype(jnp.float32))

  try:
    jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), query, keys, keys)
  except Exception as error:   # jax raises ValueError, NotImplementedError or RuntimeError
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
  return None


def _native_cpu_handlers(backend: str, head_dim: int, dtype: Any) -> str:
  """Which of the native kernel's handlers runs, or a UserError saying why none can."""
  if backend != "cpu":
    raise UserError(f"projector.attention='native_cpu' runs on CPUs only; this is {backend} "
                    "(use 'auto', 'dense' or 'dot_product')")
  supported_dtypes = [jnp.dtype(t) for t in NATIVE_CPU_DTYPES]
  if dtype not in supported_dtypes or head_dim not in NATIVE_CPU_HEAD_DIMS:
    raise UserError(f"projector.attention='native_cpu' (implementation) needs float32, bfloat16 "
                    f"or float16 q, k, v with d in {NATIVE_CPU_HEAD_DIMS}; got {dtype.name}, "
                    f"d={head_dim}")
  from adjax.kernels import native   # only here: nothing else builds or probes the kernel
  if not native.available():
    raise UserError("projector.attention='native_cpu' needs the native CPU kernel, which "
                    f"cannot run here ({native.unavailable_reason() or 'not registered'}; kernel "
                    "available: False)")
  if dtype == jnp.bfloat16 and native.amx_available():
    return "native CPU kernel, AMX bfloat16 handlers"
  return "native CPU kernel, float32 handlers"


@functools.cache
def _log_choice(requested: str, name: str, detail: str) -> None:
  level = logging.WARNING if "refuses" in detail else logging.INFO
  log.log(level, "projector attention %r: %s (%s)", requested, name, detail)


def dense_attention(q: Array, k: Array, v: Array) -> Array:
  """softmax(q k^T) v with (H, T, d) queries and (H, R, d) keys/values; softmax in float32."""
  weights = jax.nn.softmax(_logits(q, k), axis=-1).astype(v.dtype)
  return jnp.einsum("htr,hrd->htd", weights, v)


def _logits(q: Array, k: Array) -> Array:
  """q k^T per head, accumulated in float32 (H, T, R)."""
  if q.dtype == k.dtype and q.dtype in (jnp.bfloat16, jnp.float16):
    return _narrow_logits(q, k)
  return jnp.einsum("htd,hrd->htr", q, k, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _narrow_logits(q: Array, k: Array) -> Array:
  """_logits of bfloat16 (or float16) q, k, whose backward products stay in that dtype.

  Why: autodiff would meet the float32 logits' gradient with the bfloat16 q and k and run both
  (H, T, R)-sized backward products, dq and dk, in float32 (a fraction of the bfloat16 rate
  on GPUs and TPUs). Here the gradient is rounded to q's dtype first and the products
  accumulate in float32, as in the forward pass (and as the native kernel's AMX handlers and
  PyTorch's bfloat16 autocast do)."""
  return jnp.einsum("htd,hrd->htr", q, k, preferred_element_type=jnp.float32)


def _narrow_logits_fwd(q, k):
  return _narrow_logits(q, k), (q, k)


def _narrow_logits_bwd(residuals, d_logits):
  q, k = residuals
  d_logits = d_logits.astype(q.dtype)
  d_q = jnp.einsum("htr,hrd->htd", d_logits, k, preferred_element_type=jnp.float32)
  d_k = jnp.einsum("htr,htd->hrd", d_logits, q, preferred_element_type=jnp.float32)
  return d_q.astype(q.dtype), d_k.astype(k.dtype)


_narrow_logits.defvjp(_narrow_logits_fwd, _narrow_logits_bwd)


def dot_product_attention(q: Array, k: Array, v: Array, *, cudnn: bool = False,
                          groups: int = 1) -> Array:
  """The "dot_product" implementation: jax.nn.dot_product_attention on (H, T, d) queries.

  cudnn: its cuDNN form (implementation="cudnn"; a GPU only), else its XLA form.
  groups: the T queries are passed as a batch of `groups` sequences of T / groups (the keys
    broadcast to each): cuDNN's partitioner refuses a split sequence axis, so with the tokens
    split over G devices the step passes G groups, one per device, and splits the batch axis.
  """
  h, t, d = q.shape
  if t % groups:
    raise ValueError(f"dot_product_attention: {t} queries do not split into {groups} groups")
  # (H, T, d) -> (G, T / G, H, d): the projector's own (T, H, d) layout, so the transposes
  # around this call cancel.
  query = q.transpose(1, 0, 2).reshape(groups, t // groups, h, d)
  shared = lambda x: jnp.broadcast_to(x.transpose(1, 0, 2)[None], (groups, *x.shape[1:2], h, d))
  out = jax.nn.dot_product_attention(query, shared(k), shared(v), scale=1.0,
                                     implementation="cudnn" if cudnn else "xla")
  return out.reshape(t, h, d).transpose(1, 0, 2)


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
  from adjax.kernels import native

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


@functools.cache
def _native_pair(amx: bool) -> Callable[[Array, Array, Array], Array]:
  """The kernel's float32 or AMX bfloat16 attention, made on first use (imports the kernel)."""
  if amx:
    return _kernel_attention("AdjaxReferenceAttentionForwardAmx",
                             "AdjaxReferenceAttentionBackwardAmx", jnp.bfloat16)
  return _kernel_attention("AdjaxReferenceAttentionForward", "AdjaxReferenceAttentionBackward",
                           jnp.float32)


def native_cpu_attention(q: Array, k: Array, v: Array) -> Array:
  """The "native_cpu" implementation; T need not be a multiple of 8 (or 32 on AMX; padded).

  bfloat16 q, k, v on a CPU with AMX (adjax.kernels.native.amx_available): the AMX handlers,
  products in bfloat16 with float32 accumulation. Otherwise the kernel computes in float32:
  bfloat16 or float16 operands are widened on the way in (exactly) and the output rounded to
  q's dtype on the way out (AVX512-BF16 pair products were measured no faster than float32
  FMAs), the blocked form's accuracy or better at the kernel's speed.

  Raises:
    UserError: not a CPU, an unsupported dtype or head width, or the kernel cannot run here.
  """
  dtype = jnp.result_type(q, k, v)
  handlers = _native_cpu_handlers(jax.default_backend(), q.shape[-1], dtype)
  amx = "AMX" in handlers and all(x.dtype == jnp.bfloat16 for x in (q, k, v))
  t = q.shape[1]
  rows = _NATIVE_AMX_ROWS if amx else _NATIVE_CPU_ROWS
  padded = math.ceil(t / rows) * rows
  if padded != t:   # zero query rows, sliced off: they add nothing to the key/value gradients
    q = jnp.pad(q, ((0, 0), (0, padded - t), (0, 0)))
  if amx:
    return _native_pair(True)(q, k, v)[:, :t]
  wide = [x.astype(jnp.float32) for x in (q, k, v)]
  return _native_pair(False)(*wide)[:, :t].astype(q.dtype)


def reference_attention(q: Array, k: Array, v: Array, *, implementation: str = "auto",
                        query_block: int = DEFAULT_QUERY_BLOCK) -> Array:
  """softmax(q k^T) v per head (the caller scales q).

  Args:
    q: (H, T, d) queries; k, v: (H, R, d) keys and values.
    implementation: one of IMPLEMENTATIONS (see the module docstring and resolve_attention).
    query_block: queries per block of the blocked implementation.

  Returns:
    (H, T, d) in q's dtype.
  """
  if q.ndim != 3 or k.shape != v.shape or q.shape[::2] != k.shape[::2]:
    raise ValueError(f"expected q (H, T, d) and k, v (H, R, d); got q {q.shape}, k {k.shape}, "
                     f"v {v.shape}")
  dtype = jnp.result_type(q, k, v)
  name, _ = resolve_attention(implementation, num_heads=q.shape[0], head_dim=q.shape[2],
                              dtype=dtype)
  if name == "native_cpu":
    return native_cpu_attention(q, k, v)
  if name == "dense":
    return dense_attention(q, k, v).astype(q.dtype)
  if name == "dot_product":
    cudnn = _cudnn_refusal(jax.default_backend(), q.shape[0], q.shape[2], dtype) is None
    groups = math.gcd(q.shape[1], jax.device_count()) if cudnn else 1
    return dot_product_attention(q, k, v, cudnn=cudnn, groups=groups).astype(q.dtype)
  return blocked_attention(q, k, v, query_block)
