"""The projector attention's implementations side by side (adjax/models/reference_attention.py):
each against a float64 softmax and its float64 gradients; the `projector.attention` choice, its
log line and its reasons; the native kernel imported only when asked for."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adjax.errors import UserError
from adjax.models import reference_attention as attention
from adjax.models.projector import init_projector, project
from attention_reference import float64_attention


def _inputs(heads=2, queries=20, refs=24, dim=16, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(heads, queries, dim)) / np.sqrt(dim)
  k, v = (rng.normal(size=(heads, refs, dim)) for _ in range(2))
  g = rng.normal(size=(heads, queries, dim))
  return [jnp.asarray(a, dtype) for a in (q, k, v, g)]


def _native_available() -> bool:
  from adjax.kernels import native
  return native.available()


IMPLEMENTATIONS = ("dense", "dot_product", "blocked", "native_cpu")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_every_implementation_matches_float64_softmax_and_gradients(implementation, dtype,
                                                                    tolerance):
  if implementation == "native_cpu" and not _native_available():
    pytest.skip("the native CPU kernel cannot run on this machine (no AVX-512 or no compiler)")
  # 20 queries: not a multiple of the kernel's 8 (or 32) rows nor of the blocked form's block.
  q, k, v, g = _inputs(dtype=dtype)
  run = jax.jit(lambda a, b, c: attention.reference_attention(
      a, b, c, implementation=implementation, query_block=8))
  out, vjp = jax.vjp(run, q, k, v)
  assert out.dtype == dtype
  # The float64 reference of the same (rounded) operands: what is left is the implementation's
  # own arithmetic (bfloat16: products of bfloat16-rounded weights, outputs rounded).
  want = float64_attention(q, k, v, g)
  for name, got, expected in zip(("out", "dq", "dk", "dv"), (out, *vjp(g)), want):
    assert got.dtype == dtype, name
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=tolerance * scale,
                               err_msg=f"{implementation} {name}")


def test_dot_product_in_groups_is_the_same_attention():
  # The layout the step uses with cuDNN on several GPUs: the queries as a batch of groups.
  q, k, v, g = _inputs(queries=24)
  want = float64_attention(q, k, v, g)
  out, vjp = jax.vjp(lambda a, b, c: attention.dot_product_attention(a, b, c, groups=3), q, k, v)
  for name, got, expected in zip(("out", "dq", "dk", "dv"), (out, *vjp(g)), want):
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5, err_msg=name)
  with pytest.raises(ValueError, match="24 queries do not split into 5 groups"):
    attention.dot_product_attention(q, k, v, groups=5)


def _resolve(requested, **kwargs):
  return attention.resolve_attention(requested, num_heads=16, head_dim=48, **kwargs)


def test_auto_per_backend_and_device_count(monkeypatch):
  # This process: one CPU device.
  assert jax.default_backend() == "cpu" and jax.device_count() == 1
  assert _resolve("auto", dtype=jnp.float32)[0] == "blocked"
  assert _resolve("auto", dtype=jnp.bfloat16)[0] == "blocked"
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  assert _resolve("auto", dtype=jnp.bfloat16)[0] == "dense"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert _resolve("auto", dtype=jnp.bfloat16)[0] == "dense"
  # A GPU: cuDNN's own checks decide. Without cuDNN (this machine has none) the trial trace
  # fails and auto falls back to dense, saying why.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  name, reason = _resolve("auto", dtype=jnp.bfloat16)
  assert name == "dense" and "cuDNN" in reason and "refuses" in reason
  # "dot_product" asked for where cuDNN refuses: jax's XLA form, and the reason names it.
  name, reason = _resolve("dot_product", dtype=jnp.float32)
  assert name == "dot_product" and reason.startswith("XLA's form")
  # Where the trial trace passes, auto is dot_product through cuDNN.
  monkeypatch.setattr(attention, "_cudnn_refusal", lambda *args: None)
  assert _resolve("auto", dtype=jnp.bfloat16) == ("dot_product", "GPU: cuDNN fused attention")
  for explicit in ("dense", "blocked"):
    assert _resolve(explicit, dtype=jnp.bfloat16) == (explicit, "as configured")


def test_cudnn_refusal_names_dtype_and_width_off_gpu():
  # Off a GPU the refusal says so without tracing anything.
  assert "GPUs only" in attention._cudnn_refusal("cpu", 16, 48, jnp.dtype(jnp.bfloat16))


def test_bad_settings_are_user_errors(monkeypatch):
  with pytest.raises(UserError, match=r"projector.attention.*'flash'.*expected one of"):
    _resolve("flash", dtype=jnp.float32)
  with pytest.raises(UserError, match=r"native_cpu.*d in \(16, 32, 48, 64\).*d=8"):
    attention.resolve_attention("native_cpu", num_heads=2, head_dim=8, dtype=jnp.float32)
  with pytest.raises(UserError, match=r"native_cpu.*float64"):
    attention.resolve_attention("native_cpu", num_heads=2, head_dim=16, dtype=jnp.float64)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(UserError, match="runs on CPUs only; this is tpu"):
    _resolve("native_cpu", dtype=jnp.bfloat16)


def test_the_choice_is_logged_once(caplog):
  attention._log_choice.cache_clear()
  with caplog.at_level(logging.INFO, logger="adjax.attention"):
    for _ in range(3):
      _resolve("auto", dtype=jnp.float16)
  records = [r for r in caplog.records if r.name == "adjax.attention"]
  assert len(records) == 1
  assert "'auto': blocked" in records[0].getMessage()
  assert "16 heads of 48, float16" in records[0].getMessage()


def test_attention_record_for_run_metadata():
  record = attention.attention_record("auto", level_dims=(64, 64, 128), num_heads=4,
                                      dtype=jnp.bfloat16)
  assert record["requested"] == "auto" and record["implementation"] == "blocked"
  assert "one CPU device" in record["reason"]


def _levels(batch=2, side=2, dim=32, count=2, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(batch, side, side, dim)), jnp.float32)
          for _ in range(count)]


def test_project_threads_the_setting_and_every_choice_agrees():
  params = init_projector(jax.random.key(0), (32, 32), num_heads=2, num_ref_tokens=16)
  levels = _levels()
  want = [np.asarray(x) for x in project(params, levels, num_heads=2, attention="dense")]
  for name in ("auto", "dot_product", "blocked") + (("native_cpu",) if _native_available()
                                                   else ()):
    fn = jax.jit(lambda p, x, name=name: project(p, x, num_heads=2, attention=name))
    text = fn.lower(params, levels).as_text()
    assert ("adjax_reference_attention_forward" in text) == (name == "native_cpu"), name
    for got, expected in zip(fn(params, levels), want):
      np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5, err_msg=name)


_NO_NATIVE_BY_DEFAULT = """
import sys
import jax, jax.numpy as jnp
import adjax
from adjax.pretrain.step import StepSettings, pretraining_loss
params = adjax.init_projector(jax.random.key(0), (32,), num_heads=2, num_ref_tokens=16)
levels = [jnp.ones((2, 2, 2, 32))]
out = adjax.project(params, levels, num_heads=2)
for name in ("auto", "dense", "dot_product", "blocked"):
  settings = StepSettings(level_strides=(14,), num_heads=2, attention=name,
                          compute_dtype=jnp.bfloat16)
  jax.jit(jax.grad(lambda p: pretraining_loss(p, levels, levels, jnp.zeros((2, 28, 28)), None,
                                              settings)[0])).lower(params)
print("native" if "adjax.kernels.native" in sys.modules else "none")
settings = StepSettings(level_strides=(14,), num_heads=2, attention="native_cpu")
try:
  jax.jit(lambda p: pretraining_loss(p, levels, levels, jnp.zeros((2, 28, 28)), None,
                                     settings)[0]).lower(params)
except Exception as error:
  print("refused", type(error).__name__)
print("native" if "adjax.kernels.native" in sys.modules else "none")
"""


def test_the_native_kernel_is_imported_only_for_native_cpu():
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run([sys.executable, "-c", _NO_NATIVE_BY_DEFAULT], capture_output=True,
                          text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.split()
  # Projector, losses and gradients with every other setting: the kernel module never loaded.
  assert lines[0] == "none"
  # "native_cpu" imports it (and runs it, or refuses where it cannot run).
  assert lines[-1] == "native"
