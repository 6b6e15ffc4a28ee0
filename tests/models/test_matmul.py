"""adjax.models.matmul: bfloat16 products with float32 accumulation and their own VJP."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adjax.models.matmul import matmul


def _operands(m, k, n, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  w = (jax.random.normal(keys[1], (k, n)) / np.sqrt(k)).astype(jnp.bfloat16)
  g = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
  return x, w, g


def _as64(a):
  return np.asarray(a, np.float32).astype(np.float64)


@pytest.mark.parametrize("m", [64, 36])   # 36: not a multiple of 8 (the transpose's other fold)
def test_values_and_gradients_match_float64(m):
  x, w, g = _operands(m, 48, 40)
  out, vjp = jax.vjp(jax.jit(matmul), x, w)
  d_x, d_w = vjp(g)
  assert out.dtype == d_x.dtype == d_w.dtype == jnp.bfloat16
  x64, w64, g64 = _as64(x), _as64(w), _as64(g)
  for got, want in [(out, x64 @ w64), (d_x, g64 @ w64.T), (d_w, x64.T @ g64)]:
    # Exact products of bfloat16 inputs, accumulated in float32 and rounded once to bfloat16:
    # within half a bfloat16 unit (2^-9 relative) of the exact value, plus float32 rounding.
    np.testing.assert_allclose(_as64(got), want, rtol=2 ** -8, atol=1e-5 * np.abs(want).max())


def test_gradients_through_a_loss_under_jit():
  x, w, g = _operands(128, 64, 96, seed=1)

  def loss(product, x, w):
    return jnp.sum(product(x, w).astype(jnp.float32) * g.astype(jnp.float32))

  ours = jax.jit(jax.grad(lambda x, w: loss(matmul, x, w), argnums=(0, 1)))(x, w)
  x64, w64, g64 = _as64(x), _as64(w), _as64(g)
  np.testing.assert_allclose(_as64(ours[0]), g64 @ w64.T, rtol=2 ** -8, atol=1e-4)
  np.testing.assert_allclose(_as64(ours[1]), x64.T @ g64, rtol=2 ** -8, atol=1e-4)


def test_leading_axes_are_kept():
  x, w, _ = _operands(24, 16, 8, seed=2)
  out = matmul(x.reshape(2, 3, 4, 16), w)
  assert out.shape == (2, 3, 4, 8)
  np.testing.assert_array_equal(np.asarray(out).reshape(24, 8), np.asarray(matmul(x, w)))


def test_float32_is_the_plain_product():
  x, w, _ = _operands(16, 8, 4, seed=3)
  x, w = x.astype(jnp.float32), w.astype(jnp.float32)
  np.testing.assert_array_equal(np.asarray(matmul(x, w)), np.asarray(x @ w))


def test_mismatched_shapes_are_named():
  with pytest.raises(ValueError, match=r"\(4, 3\) and \(5, 2\)"):
    matmul(jnp.ones((4, 3), jnp.bfloat16), jnp.ones((5, 2), jnp.bfloat16))


def test_no_product_falls_back_to_float32_on_cpu():
  """Where XLA:CPU runs a plain bfloat16 -> float32 product on its matrix-unit library (YNNPACK),
  all three of matmul's products (forward, input and weight gradient) must run there too,
  rather than being widened to float32 dots (the weight gradient was, before the row-major
  transpose)."""
  x, w, g = _operands(256, 128, 128, seed=4)
  plain = jax.jit(lambda a, b: jax.lax.dot_general(
      a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32))
  if "__ynn_fusion" not in plain.lower(x, w).compile().as_text():
    pytest.skip("this XLA:CPU build runs no bfloat16 product on YNNPACK")
  step = jax.jit(lambda x, w: jax.vjp(matmul, x, w)[1](g))
  text = step.lower(x, w).compile().as_text()
  # d_x and d_w: each product is one YNNPACK fusion, and no other dot is left.
  assert text.count('"kind":"__ynn_fusion"') == 2
  assert text.count(" dot(") == 2


_SHARDED_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from adjax.models.matmul import matmul
assert jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.random.normal(jax.random.key(0), (8 * 36, 64), jnp.bfloat16)
w = jax.random.normal(jax.random.key(1), (64, 48), jnp.bfloat16)
grads = lambda x, w: jax.grad(
    lambda x, w: jnp.sum(jnp.sin(matmul(x, w).astype(jnp.float32))), argnums=(0, 1))(x, w)
one = jax.jit(grads)(x, w)
many = jax.jit(grads)(jax.device_put(x, NamedSharding(mesh, P("data"))),
                      jax.device_put(w, NamedSharding(mesh, P())))
for a, b in zip(one, many):
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
print("same")
"""


def test_sharded_over_eight_devices_equals_one_device():
  """The weight gradient's transpose copy and barrier, split over a data-parallel mesh (tokens
  sharded, 36 per device: not a multiple of 8 tokens per device), give the one-device values."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-c", _SHARDED_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and "same" in result.stdout, result.stderr[-2000:]


def test_accumulating_dot_general_for_frozen_modules():
  from adjax.models.matmul import accumulating_dot_general
  x, w, _ = _operands(32, 48, 40, seed=5)
  dims = (((1,), (0,)), ((), ()))
  got = accumulating_dot_general(x, w, dims)
  assert got.dtype == jnp.bfloat16
  want = _as64(x) @ _as64(w)
  np.testing.assert_allclose(_as64(got), want, rtol=2 ** -8, atol=1e-5 * np.abs(want).max())
  # In nn.Dense on (B, L, C) inputs, and plain for float32 (the same array as lax.dot_general).
  import flax.linen as nn
  dense = nn.Dense(40, dtype=jnp.bfloat16, dot_general=accumulating_dot_general)
  params = dense.init(jax.random.key(0), x.reshape(4, 8, 48))
  out = dense.apply(params, x.reshape(4, 8, 48))
  assert out.shape == (4, 8, 40) and out.dtype == jnp.bfloat16
  x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
  np.testing.assert_array_equal(np.asarray(accumulating_dot_general(x32, w32, dims)),
                                np.asarray(jax.lax.dot_general(x32, w32, dims)))
