"""Attention over reference tokens: blocked (custom VJP) and dense agree with a float64 numpy
softmax and with each other, for values and gradients, any block size, with padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adjax.models.reference_attention import (blocked_attention, dense_attention,
                                              reference_attention)
from attention_reference import float64_attention


def _numpy_attention(q, k, v):
  """Independent float64 forward: softmax(q k^T) v per head."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("htd,hrd->htr", q, k)
  logits -= logits.max(-1, keepdims=True)
  weights = np.exp(logits)
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("htr,hrd->htd", weights, v)


def _inputs(heads=3, queries=37, refs=50, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(heads, queries, dim)).astype(np.float32)
  k = rng.normal(size=(heads, refs, dim)).astype(np.float32)
  v = rng.normal(size=(heads, refs, dim)).astype(np.float32)
  cotangent = rng.normal(size=(heads, queries, dim)).astype(np.float32)
  return q, k, v, cotangent


@pytest.mark.parametrize("block", [1, 8, 16, 37, 64])
def test_blocked_matches_numpy_and_dense_gradients(block):
  q, k, v, cotangent = _inputs()
  want = _numpy_attention(q, k, v)
  got, vjp = jax.vjp(lambda a, b, c: blocked_attention(a, b, c, block), q, k, v)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
  _, dense_vjp = jax.vjp(dense_attention, q, k, v)
  for name, g, d in zip("qkv", vjp(cotangent), dense_vjp(cotangent)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(d), atol=2e-5, err_msg=name)


def _finite_difference_check(attention, q, k, v, cotangent, eps=1e-5):
  """attention's float32 VJP against central differences of the float64 numpy softmax."""
  q, k, v, cotangent = (np.asarray(a, np.float64) for a in (q, k, v, cotangent))
  _, vjp = jax.vjp(attention, *(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  grads = [np.asarray(g, np.float64) for g in vjp(jnp.asarray(cotangent, jnp.float32))]
  for index, name in enumerate("qkv"):
    args = [q, k, v]
    numeric = np.zeros_like(args[index])
    for position in np.ndindex(args[index].shape):
      shifted = [a.copy() for a in args]
      shifted[index][position] += eps
      up = np.sum(_numpy_attention(*shifted) * cotangent)
      shifted[index][position] -= 2 * eps
      down = np.sum(_numpy_attention(*shifted) * cotangent)
      numeric[position] = (up - down) / (2 * eps)
    np.testing.assert_allclose(grads[index], numeric, atol=1e-4, err_msg=name)


def test_gradients_match_finite_differences():
  # An independent check of the custom VJP (not through the dense autodiff).
  q, k, v, cotangent = _inputs(heads=2, queries=5, refs=7, dim=3, seed=1)
  _finite_difference_check(lambda a, b, c: blocked_attention(a, b, c, 2), q, k, v, cotangent)


def test_implementations_agree_under_jit_and_bfloat16():
  q, k, v, _ = _inputs(heads=4, queries=64, refs=96, dim=16)
  for dtype, atol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
    args = [jnp.asarray(a, dtype) for a in (q, k, v)]
    blocked = jax.jit(lambda a, b, c: reference_attention(a, b, c, implementation="blocked",
                                                          query_block=16))(*args)
    dense = jax.jit(lambda a, b, c: reference_attention(a, b, c, implementation="dense"))(*args)
    assert blocked.dtype == dtype and dense.dtype == dtype
    np.testing.assert_allclose(np.asarray(blocked, np.float32), np.asarray(dense, np.float32),
                               atol=atol)
  # On a single CPU device (this test process) "auto" is the blocked custom-VJP form, never the
  # dense autodiff (nor the native kernel, which only "native_cpu" runs).
  auto = reference_attention(*(jnp.asarray(a) for a in (q, k, v)))
  assert "custom_vjp" in str(jax.make_jaxpr(reference_attention)(q, k, v))
  assert "custom_vjp" not in str(jax.make_jaxpr(
      lambda a, b, c: reference_attention(a, b, c, implementation="dense"))(q, k, v))
  # Outputs reach 2.6: 4e-6 is float32 rounding (dense: 1.1e-6, blocked: 2.1e-6).
  np.testing.assert_allclose(np.asarray(auto), _numpy_attention(q, k, v), atol=4e-6)


def test_large_logits_stay_finite():
  q, k, v, cotangent = _inputs(heads=1, queries=9, refs=11, dim=4)
  q = q * 400.0   # logits in the thousands: exp would overflow without the max shift
  got, vjp = jax.vjp(lambda a, b, c: blocked_attention(a, b, c, 4), q, k, v)
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v), atol=1e-4)
  assert all(np.isfinite(np.asarray(g)).all() for g in vjp(cotangent))


def test_bad_arguments_are_named():
  q, k, v, _ = _inputs()
  with pytest.raises(ValueError, match="implementation"):
    reference_attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match=r"q \(H, T, d\)"):
    reference_attention(q, k[:, :, :4], v)


# The native kernel (adjax/kernels/reference_attention_cpu.cc): same values and gradients.

def _needs_native_kernel():
  from adjax.kernels import native
  if not native.available():
    pytest.skip("the native CPU kernel cannot run on this machine (no AVX-512 or no compiler)")


@pytest.mark.parametrize("dim,queries,refs", [(16, 37, 50), (48, 64, 2048), (64, 9, 7),
                                              (32, 130, 33)])
def test_native_cpu_matches_numpy_and_dense_gradients(dim, queries, refs):
  # Queries not a multiple of 8 (padded), keys not a multiple of the kernel's 32-wide panels
  # (masked), fewer keys than one panel, more queries than one 64-query block.
  _needs_native_kernel()
  q, k, v, cotangent = _inputs(heads=3, queries=queries, refs=refs, dim=dim, seed=dim)
  q = q / np.sqrt(dim)
  got, vjp = jax.vjp(jax.jit(lambda a, b, c: reference_attention(
      a, b, c, implementation="native_cpu")), q, k, v)
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v), atol=3e-6)
  _, dense_vjp = jax.vjp(dense_attention, q, k, v)
  for name, g, d in zip("qkv", vjp(cotangent), dense_vjp(cotangent)):
    scale = float(np.max(np.abs(np.asarray(d))))
    np.testing.assert_allclose(np.asarray(g), np.asarray(d), atol=2e-6 * max(scale, 1.0),
                               err_msg=name)


def test_native_cpu_gradients_match_finite_differences():
  _needs_native_kernel()
  q, k, v, cotangent = _inputs(heads=2, queries=3, refs=5, dim=16, seed=2)
  _finite_difference_check(
      lambda a, b, c: reference_attention(a, b, c, implementation="native_cpu"), q / 4, k, v,
      cotangent)


def test_native_cpu_large_logits_stay_finite_and_only_native_cpu_uses_it():
  _needs_native_kernel()
  q, k, v, cotangent = _inputs(heads=2, queries=16, refs=40, dim=32)
  q = q * 100.0   # logits in the thousands: exp would overflow without the max shift
  got, vjp = jax.vjp(lambda a, b, c: reference_attention(a, b, c, implementation="native_cpu"),
                     q, k, v)
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v), atol=1e-4)
  assert all(np.isfinite(np.asarray(g)).all() for g in vjp(cotangent))
  # "native_cpu" calls the kernel forward and backward; "auto" (here: blocked) never does.
  program = jax.jit(jax.grad(lambda a, b, c: jnp.sum(reference_attention(
      a, b, c, implementation="native_cpu")), argnums=(0, 1, 2))).lower(q, k, v).as_text()
  assert "adjax_reference_attention_forward" in program
  assert "adjax_reference_attention_backward" in program
  auto = jax.jit(jax.grad(lambda a, b, c: jnp.sum(reference_attention(a, b, c)),
                          argnums=(0, 1, 2))).lower(q, k, v).as_text()
  assert "adjax_reference_attention" not in auto


def test_native_cpu_refuses_what_it_cannot_take(monkeypatch):
  from adjax.kernels import native
  q, k, v, _ = _inputs(heads=1, queries=8, refs=8, dim=8)
  with pytest.raises(ValueError, match=r"native_cpu.*d in \(16, 32, 48, 64\).*d=8"):
    reference_attention(q, k, v, implementation="native_cpu")
  monkeypatch.setattr(native, "available", lambda: False)
  q, k, v, _ = _inputs(heads=1, queries=8, refs=8, dim=16)
  with pytest.raises(ValueError, match="kernel available: False"):
    reference_attention(q, k, v, implementation="native_cpu")
  # "auto" runs the blocked form, with the same result.
  program = jax.jit(lambda a, b, c: reference_attention(a, b, c)).lower(q, k, v).as_text()
  assert "adjax_reference_attention" not in program
  np.testing.assert_allclose(np.asarray(reference_attention(q, k, v)),
                             _numpy_attention(q, k, v), atol=3e-6)


def test_native_cpu_takes_bfloat16_in_float32(monkeypatch):
  # Without AMX, bfloat16 operands are widened exactly, so the kernel's output is the float32
  # attention of the bfloat16 values, rounded once; gradients come back in bfloat16.
  _needs_native_kernel()
  from adjax.kernels import native
  monkeypatch.setattr(native, "amx_available", lambda: False)
  q, k, v, cotangent = _inputs(heads=2, queries=20, refs=40, dim=16, seed=5)
  q16, k16, v16 = (jnp.asarray(a / 2, jnp.bfloat16) for a in (q, k, v))
  got, vjp = jax.vjp(lambda a, b, c: reference_attention(a, b, c, implementation="native_cpu"),
                     q16, k16, v16)
  assert got.dtype == jnp.bfloat16
  want = _numpy_attention(*(np.asarray(a, np.float32) for a in (q16, k16, v16)))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=1e-2)
  program = jax.jit(lambda a, b, c: reference_attention(
      a, b, c, implementation="native_cpu")).lower(q16, k16, v16).as_text()
  assert "adjax_reference_attention_forward" in program and "_amx" not in program
  grads = vjp(jnp.asarray(cotangent, jnp.bfloat16))
  _, wide_vjp = jax.vjp(dense_attention, *(jnp.asarray(a, jnp.float32) for a in (q16, k16, v16)))
  for name, g, d in zip("qkv", grads, wide_vjp(jnp.asarray(cotangent, jnp.float32))):
    assert g.dtype == jnp.bfloat16, name
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(d), atol=5e-2, rtol=2e-2,
                               err_msg=name)


def _needs_amx():
  from adjax.kernels import native
  if not native.amx_available():
    pytest.skip("this CPU (or Linux) offers no AMX tiles: the bfloat16 AMX handlers cannot run")


@pytest.mark.parametrize("dim,queries,refs,scale", [
    (48, 64, 2048, 1.0),   # the paper's head width and key count
    (16, 37, 50, 1.0),     # queries not a multiple of 32 (padded), keys not of 16 (masked)
    (64, 9, 7, 1.0),       # fewer keys than one 16-key tile
    (32, 130, 33, 1.0),    # several 32-query blocks, one key past a 32-key pair block
    (48, 32, 40, 30.0)])   # logits in the hundreds: exp would overflow without the max shift
def test_native_cpu_bfloat16_on_amx_matches_float64(dim, queries, refs, scale):
  # The AMX handlers: bfloat16 products accumulated in float32, softmax and its gradient in
  # float32, weights and logit gradients rounded to bfloat16 before their products. Checked
  # against a float64 softmax of the same bfloat16 inputs, to bfloat16 accuracy.
  _needs_native_kernel()
  _needs_amx()
  q, k, v, cotangent = _inputs(heads=3, queries=queries, refs=refs, dim=dim, seed=dim + refs)
  q16, k16, v16, g16 = (jnp.asarray(a, jnp.bfloat16)
                        for a in (q * scale / np.sqrt(dim), k, v, cotangent))
  program = jax.jit(jax.grad(lambda a, b, c: jnp.sum(reference_attention(
      a, b, c, implementation="native_cpu")), argnums=(0, 1, 2))).lower(q16, k16, v16).as_text()
  assert "adjax_reference_attention_forward_amx" in program
  assert "adjax_reference_attention_backward_amx" in program
  got, vjp = jax.vjp(jax.jit(lambda a, b, c: reference_attention(
      a, b, c, implementation="native_cpu")), q16, k16, v16)
  assert got.dtype == jnp.bfloat16
  wide = [np.asarray(a, np.float32) for a in (q16, k16, v16, g16)]
  want = _numpy_attention(*wide[:3])
  np.testing.assert_allclose(np.asarray(got, np.float32), want,
                             atol=1e-2 * np.abs(want).max())
  for name, g, d in zip("qkv", vjp(g16), float64_attention(*wide)[1:]):
    assert g.dtype == jnp.bfloat16, name
    np.testing.assert_allclose(np.asarray(g, np.float32), d, atol=1.5e-2 * np.abs(d).max(),
                               err_msg=name)


def test_native_cpu_bfloat16_on_amx_keeps_nan_visible():
  _needs_native_kernel()
  _needs_amx()
  q, k, v, _ = _inputs(heads=2, queries=32, refs=40, dim=16, seed=3)
  q[1, 5, 2] = np.nan
  q16, k16, v16 = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
  got = np.asarray(reference_attention(q16, k16, v16, implementation="native_cpu"), np.float32)
  assert np.isnan(got[1, 5]).all() and np.isfinite(np.delete(got[1], 5, axis=0)).all()
  assert np.isfinite(got[0]).all()


def test_native_cpu_keeps_nan_visible():
  # A diverged projector must still give a non-finite loss (the train step then skips the
  # update and counts it): a NaN query makes its own output row NaN, as in the dense form.
  _needs_native_kernel()
  q, k, v, _ = _inputs(heads=2, queries=16, refs=40, dim=16, seed=3)
  q[1, 5, 2] = np.nan
  got = np.asarray(reference_attention(q, k, v, implementation="native_cpu"))
  want = np.asarray(dense_attention(q, k, v))
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  assert np.isnan(got[1, 5]).all() and np.isfinite(np.delete(got[1], 5, axis=0)).all()


def test_amx_attention_between_xla_amx_products():
  # XLA's own bfloat16 products (YNNPACK, on AMX too) run on the same threads before and after
  # the kernel, which sets its own tile configuration and gives the previous one back: values
  # and gradients of the chain match the float32 chain to bfloat16 accuracy, call after call.
  _needs_native_kernel()
  _needs_amx()
  from adjax.models.matmul import matmul
  rng = np.random.default_rng(7)
  x = rng.normal(size=(96, 64)).astype(np.float32)
  w_in, w_out = (rng.normal(size=(64, 64)).astype(np.float32) / 8 for _ in range(2))
  keys, values = (rng.normal(size=(4, 80, 16)).astype(np.float32) for _ in range(2))

  def chain(x, w_in, w_out, implementation):
    q = matmul(x, w_in).reshape(96, 4, 16).transpose(1, 0, 2)
    attended = reference_attention(q, keys.astype(x.dtype), values.astype(x.dtype),
                                   implementation=implementation)
    out = matmul(attended.transpose(1, 0, 2).reshape(96, 64), w_out)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))

  narrow = jax.jit(jax.value_and_grad(lambda *a: chain(*a, "native_cpu"), argnums=(0, 1, 2)))
  program = narrow.lower(*(jnp.asarray(a, jnp.bfloat16) for a in (x, w_in, w_out))).compile()
  assert "adjax_reference_attention_forward_amx" in program.as_text()
  assert "__ynn_fusion" in program.as_text()
  want_loss, want_grads = jax.value_and_grad(lambda *a: chain(*a, "dense"), argnums=(0, 1, 2))(
      x, w_in, w_out)
  for _ in range(3):
    loss, grads = narrow(*(jnp.asarray(a, jnp.bfloat16) for a in (x, w_in, w_out)))
    assert abs(float(loss) - float(want_loss)) < 0.02 * max(1.0, abs(float(want_loss)))
    for g, d in zip(grads, want_grads):
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(d),
                                 atol=0.03 * float(np.abs(d).max()))
