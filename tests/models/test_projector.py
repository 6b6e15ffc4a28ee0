"""Projector: golden parity, conversion both ways, jit, bfloat16, gradients, PyTorch parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adjax
from adjax.models.projector import se_hidden_dim
from conftest import FIXTURES


@pytest.fixture(scope="module")
def golden():
  data = np.load(FIXTURES / "projector.npz")
  state_dict = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
  levels_in = [data[f"in/l{k}"].transpose(0, 2, 3, 1) for k in range(1, 5)]
  levels_out = [data[f"out/l{k}"].transpose(0, 2, 3, 1) for k in range(1, 5)]
  return state_dict, levels_in, levels_out


def test_golden_outputs(golden):
  state_dict, levels_in, levels_out = golden
  params = adjax.projector_from_torch(state_dict)
  outputs = adjax.project(params, [jnp.asarray(x) for x in levels_in])
  for got, want in zip(outputs, levels_out):
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_wrapped_checkpoint_and_round_trip(golden):
  state_dict, _, _ = golden
  params = adjax.projector_from_torch({"projectors": state_dict, "epoch": 3})
  back = adjax.projector_to_torch(params)
  assert sorted(back) == sorted(state_dict)
  for key, value in state_dict.items():
    assert back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value)


def test_jit_matches_eager(golden):
  state_dict, levels_in, _ = golden
  params = adjax.projector_from_torch(state_dict)
  eager = adjax.project(params, levels_in)
  jitted = jax.jit(adjax.project)(params, levels_in)
  for a, b in zip(eager, jitted):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bfloat16_close_to_float32(golden):
  state_dict, levels_in, _ = golden
  params = adjax.projector_from_torch(state_dict)
  full = adjax.project(params, levels_in)
  half = jax.jit(lambda p, x: adjax.project(p, x, dtype=jnp.bfloat16))(params, levels_in)
  for a, b in zip(full, half):
    assert b.dtype == jnp.bfloat16
    scale = np.abs(np.asarray(a)).max()
    assert np.abs(np.asarray(a) - np.asarray(b, np.float32)).max() / scale < 2e-2


def test_gradients_reach_every_parameter():
  params = adjax.init_projector(jax.random.key(0), [32, 48], num_heads=4, num_ref_tokens=64)
  levels = [jax.random.normal(jax.random.key(1), (2, 3, 4, 32)),
            jax.random.normal(jax.random.key(2), (2, 2, 2, 48))]

  def loss(p):
    return sum(jnp.sum(jnp.sin(out)) for out in adjax.project(p, levels, num_heads=4))

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    g, name = np.asarray(g), jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    if "['key']['bias']" in name:
      # The softmax is invariant to a shift of every key: the true gradient is zero and the
      # projector returns it exactly (see _Linear.zero_bias_gradient).
      assert np.all(g == 0), name
    else:
      assert np.abs(g).max() > 0, name


def test_head_count_must_divide_channels():
  params = adjax.init_projector(jax.random.key(0), [24], num_heads=4, num_ref_tokens=8)
  with pytest.raises(ValueError, match="num_heads=5"):
    adjax.project(params, [jnp.zeros((1, 2, 2, 24))], num_heads=5)


@pytest.mark.parametrize("mlp_dim, expected", [(3072, 192), (256, 16), (320, 24), (448, 32),
                                               (64, 8), (16, 8)])
def test_se_width(mlp_dim, expected):
  assert se_hidden_dim(mlp_dim) == expected


def test_bad_state_dicts_are_named(golden):
  state_dict, _, _ = golden
  missing = dict(state_dict)
  del missing["l2_proj.layers.0.mlp.fc1.bias"]
  with pytest.raises(ValueError, match="l2_proj.layers.0.mlp.fc1.bias"):
    adjax.projector_from_torch(missing)
  extra = dict(state_dict, **{"l1_proj.layers.0.norm.weight": np.zeros(64, np.float32)})
  with pytest.raises(ValueError, match="l1_proj.layers.0.norm.weight"):
    adjax.projector_from_torch(extra)
  shaped = dict(state_dict)
  shaped["l3_proj.layers.0.mlp.fc2.weight"] = np.zeros((64, 100), np.float32)
  with pytest.raises(ValueError, match="l3_proj.layers.0.mlp.fc2"):
    adjax.projector_from_torch(shaped)
  with pytest.raises(ValueError, match="no projector keys"):
    adjax.projector_from_torch({"model": {}})


@pytest.mark.torch
@pytest.mark.parametrize("dims, heads, num_ref, depth", [([32, 48], 4, 96, 1), ([16], 2, 40, 2)])
def test_export_loads_strictly_into_torch_and_matches(dims, heads, num_ref, depth):
  torch = pytest.importorskip("torch")
  from torch_reference import Projector
  params = adjax.init_projector(jax.random.key(3), dims, num_heads=heads,
                                num_ref_tokens=num_ref, depth=depth)
  state_dict = adjax.projector_to_torch(params)
  model = Projector(dims, heads, num_ref, depth).eval()
  model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}, strict=True)
  rng = np.random.default_rng(0)
  levels = [rng.normal(size=(3, 5, 4, d)).astype(np.float32) for d in dims]
  ours = adjax.project(params, levels, num_heads=heads)
  with torch.no_grad():
    theirs = model([torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in levels])
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(np.asarray(a), b.numpy().transpose(0, 2, 3, 1), atol=1e-4)
  # torch -> adjax -> torch with torch tensors as input gives back the same arrays.
  again = adjax.projector_to_torch(adjax.projector_from_torch(model.state_dict()))
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(again[key], value.numpy())


@pytest.mark.torch
@pytest.mark.parametrize("dims, heads, num_ref, depth", [([32, 48], 4, 96, 1), ([16], 2, 40, 2)])
def test_gradients_match_torch_autograd(dims, heads, num_ref, depth):
  """Every parameter's gradient (through the blocked attention's and the squeeze-excite GELU's
  hand-written backward passes) against torch autograd on the reference model."""
  torch = pytest.importorskip("torch")
  from torch_reference import Projector
  params = adjax.init_projector(jax.random.key(5), dims, num_heads=heads,
                                num_ref_tokens=num_ref, depth=depth)
  model = Projector(dims, heads, num_ref, depth)
  model.load_state_dict({k: torch.from_numpy(v.copy())
                         for k, v in adjax.projector_to_torch(params).items()}, strict=True)
  rng = np.random.default_rng(1)
  levels = [rng.normal(size=(3, 5, 4, d)).astype(np.float32) for d in dims]
  weights = [rng.normal(size=x.shape).astype(np.float32) for x in levels]

  def loss(p):
    outs = adjax.project(p, [jnp.asarray(x) for x in levels], num_heads=heads)
    return sum(jnp.sum(o * w) for o, w in zip(outs, weights))

  ours = adjax.projector_to_torch(jax.jit(jax.grad(loss))(params))
  outs = model([torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in levels])
  sum(torch.sum(o * torch.from_numpy(w.transpose(0, 3, 1, 2).copy()))
      for o, w in zip(outs, weights)).backward()
  for name, parameter in model.named_parameters():
    expected = parameter.grad.numpy()
    # Relative to the largest entry: in_proj_bias holds the key bias, whose true gradient is 0
    # (adjax returns exactly 0, torch float noise; see _Linear.zero_bias_gradient).
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(ours[name], expected, rtol=1e-4, atol=1e-4 * scale,
                               err_msg=name)


@pytest.mark.torch
def test_exact_gelu_and_its_derivative_match_torch():
  """The projector's GELU (erf form) and the derivative its MLP's backward uses against
  torch.nn.functional.gelu's values and autograd gradient, tails included."""
  torch = pytest.importorskip("torch")
  from adjax.models.projector import _exact_gelu, _exact_gelu_derivative
  x = np.concatenate([np.linspace(-12, 12, 4801), [-40, -8.5, 0, 1e-6, 8.5, 40]]).astype(np.float32)
  tx = torch.tensor(x, requires_grad=True)
  torch.nn.functional.gelu(tx).sum().backward()
  values, grads = _exact_gelu(jnp.asarray(x)), _exact_gelu_derivative(jnp.asarray(x))
  want = torch.nn.functional.gelu(tx).detach().numpy()
  np.testing.assert_allclose(np.asarray(values), want, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grads), tx.grad.numpy(), atol=2e-6, rtol=1e-5)
  # Under jit, on arrays, and weighted as a cotangent weights it.
  w = np.cos(x)
  g = jax.jit(lambda v: _exact_gelu_derivative(v) * w)(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(g), tx.grad.numpy() * w, atol=2e-6, rtol=1e-5)
