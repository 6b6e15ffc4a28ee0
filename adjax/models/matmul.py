"""bfloat16 products with float32 accumulation: `matmul` for the projector's linear layers
(forward and backward), `accumulating_dot_general` for the frozen backbones' dense layers
(forward only).

Every platform: `matmul` has its own VJP so that all three products (x w, g w^T, x^T g) take
bfloat16 operands and accumulate in float32 through ordinary `lax.dot_general`s
(preferred_element_type=float32), each rounded to bfloat16 once. Autodiff of a plain
`dot_general(x, w, preferred_element_type=float32)` would instead run both backward products
in float32 (its transpose rule widens the bfloat16 operands to meet the float32 cotangent), at
a fraction of the bfloat16 rate on GPUs and TPUs.

CPU only (under `lax.platform_dependent`, so GPU and TPU programs never contain it): XLA:CPU
hands a dot to YNNPACK (AMX / AVX512-BF16 where the CPU has them: measured 1.1-1.5 TFLOP/s on
2 cores of this project's CPU, against 250-300 for float32) only when it is bfloat16 x
bfloat16 -> float32, the left operand's contracted axis is its last one and neither operand is
a transpose in memory (XLA gives a transpose a column-major layout, which YNNPACK refuses, and
the layout travels through elementwise ops and optimisation barriers). The weight gradient x^T
g contracts the token axis, the first of x: on the CPU it reads a copy of x^T made in row-major
memory (the transpose reshaped to 3-D behind an optimisation barrier, which stops XLA from
folding it back into the dot). Likewise `accumulating_dot_general` accumulates in float32 on
the CPU only (XLA:CPU would otherwise upcast a bfloat16 x bfloat16 -> bfloat16 dot to a float32
one); elsewhere it is the plain dot_general, which GPUs and TPUs accumulate in float32 anyway.
Same values everywhere (tested); for float32 both are the plain product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_NN = (((1,), (0,)), ((), ()))   # a (M, K) @ (K, N)
_NT = (((1,), (1,)), ((), ()))   # a (M, K) @ b (N, K)^T
_TN = (((0,), (0,)), ((), ()))   # a (K, M)^T @ b (K, N)


def matmul(x: Array, w: Array) -> Array:
  """x (..., K) @ w (K, N) -> (..., N) in the operands' (common) dtype.

  bfloat16 operands: every product of forward and backward in bfloat16 with float32
  accumulation (see above); other dtypes are plain `x @ w`."""
  if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"matmul: expected x (..., K) and w (K, N), got {x.shape} and {w.shape}")
  if x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
    return x @ w
  flat = x.reshape(-1, x.shape[-1])
  return _bf16_matmul(flat, w).reshape(*x.shape[:-1], w.shape[1])


def accumulating_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                             preferred_element_type=None) -> Array:
  """lax.dot_general for nn.Dense in modules that are only run forward (the frozen backbones):
  on the CPU, bfloat16 operands accumulate in float32 and the result is rounded to bfloat16
  once, so that XLA:CPU runs the product on the matrix units (see above); on other platforms
  and for other dtypes, the plain product."""
  plain = lambda a, b: lax.dot_general(a, b, dimension_numbers, precision=precision,
                                       preferred_element_type=preferred_element_type)
  if lhs.dtype != jnp.bfloat16 or rhs.dtype != jnp.bfloat16 or preferred_element_type is not None:
    return plain(lhs, rhs)

  def cpu(a, b):
    return lax.dot_general(a, b, dimension_numbers, precision=precision,
                           preferred_element_type=jnp.float32).astype(jnp.bfloat16)

  return lax.platform_dependent(lhs, rhs, cpu=cpu, default=plain)


def _dot(a: Array, b: Array, dimensions) -> Array:
  """A float32-accumulated product, rounded once to bfloat16."""
  return lax.dot_general(a, b, dimensions,
                         preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _row_major_transpose(x: Array) -> Array:
  """x^T as its own row-major copy (see the module docstring; CPU only); x is (M, K), K > 0."""
  m, k = x.shape
  split = 8 if m % 8 == 0 else 1
  folded = lax.optimization_barrier(x.T.reshape(k, m // split, split))
  return folded.reshape(k, m)


def _weight_gradient_cpu(x: Array, g: Array) -> Array:
  return _dot(_row_major_transpose(x), g, _NN)


def _weight_gradient_default(x: Array, g: Array) -> Array:
  return _dot(x, g, _TN)


@jax.custom_vjp
def _bf16_matmul(x: Array, w: Array) -> Array:
  return _dot(x, w, _NN)


def _bf16_matmul_fwd(x, w):
  return _dot(x, w, _NN), (x, w)


def _bf16_matmul_bwd(residuals, g):
  x, w = residuals
  d_x = _dot(g, w, _NT)
  d_w = lax.platform_dependent(x, g, cpu=_weight_gradient_cpu, default=_weight_gradient_default)
  return d_x, d_w


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)
