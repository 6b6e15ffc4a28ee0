"""Angle and norm losses: golden values and gradients, blocking, empty cases, torch parity."""

import jax
import numpy as np
import pytest

import adjax
from conftest import FIXTURES


@pytest.fixture(scope="module")
def angle_golden():
  return np.load(FIXTURES / "angle_loss.npz")


@pytest.mark.parametrize("mode", ["center", "nocenter"])
@pytest.mark.parametrize("block_size", [4096, 64, 37])
def test_angle_loss_golden(angle_golden, mode, block_size):
  d = angle_golden
  center = d["center"] if mode == "center" else None
  fn = jax.jit(lambda a, b: adjax.angle_loss(a, b, d["mask"], center, float(d["temp"]),
                                              block_size=block_size))
  value, (g1, g2) = jax.value_and_grad(fn, argnums=(0, 1))(d["e1"], d["e2"])
  np.testing.assert_allclose(float(value), float(d[f"{mode}/loss"]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g1), d[f"{mode}/grad_e1"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(g2), d[f"{mode}/grad_e2"], atol=1e-4, rtol=0)
  # Relative agreement of the gradient too (the gradients are ~1e-3 in size).
  assert np.abs(np.asarray(g1) - d[f"{mode}/grad_e1"]).max() < 1e-3 * np.abs(
      d[f"{mode}/grad_e1"]).max()


# tau 0.2 takes the single-device minority-rows path (blocks of min(block, 256) rows of the
# rarer label: one, several, or exactly full ones); tau 0.02 the running-maximum paths (one
# block at 1024, streaming at 16 and 8). (40, 0.8): anomalous tokens are the majority.
@pytest.mark.torch
@pytest.mark.parametrize("n, dim, share, temp", [
    (50, 16, 0.2, 0.2), (300, 40, 0.05, 0.2), (7, 3, 0.5, 0.2), (40, 8, 0.8, 0.2),
    (40, 8, 0.2, 0.2), (50, 16, 0.2, 0.02), (40, 8, 0.8, 0.02)])
def test_angle_loss_against_dense_torch(n, dim, share, temp):
  torch = pytest.importorskip("torch")
  from torch_reference import angle_loss_dense
  rng = np.random.default_rng(n)
  e1 = rng.normal(size=(n, dim)).astype(np.float32)
  e2 = (e1 + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
  # An exact share: with (40, 0.2), 8 anomalous tokens are 16 minority rows, one full block
  # of 16 or two of 8.
  mask = np.zeros(n, np.float32)
  mask[rng.permutation(n)[:max(1, round(share * n))]] = 1
  mask[0], mask[1] = 1, 0
  center = rng.normal(size=dim).astype(np.float32) * 0.1
  t1, t2 = torch.tensor(e1, requires_grad=True), torch.tensor(e2, requires_grad=True)
  ref = angle_loss_dense(t1, t2, torch.tensor(mask), torch.tensor(center), temp)
  ref.backward()
  for block in (1024, 16, 8):
    value, (g1, g2) = jax.jit(jax.value_and_grad(
        lambda a, b: adjax.angle_loss(a, b, mask, center, temp, block_size=block),
        argnums=(0, 1)))(e1, e2)
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), t1.grad.numpy(), atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(g2), t2.grad.numpy(), atol=1e-6, rtol=1e-4)


def test_angle_loss_labels_change_without_recompiling():
  """The minority-rows loop runs as many blocks as the labels need: one compiled function
  serves batches with 1, 9 or 19 anomalous tokens of 20 (1 to 3 blocks of 4 rows of the rarer
  label, anomalous or normal) and matches a dense computation of the loss."""
  rng = np.random.default_rng(3)
  e1, e2 = rng.normal(size=(2, 20, 8)).astype(np.float32)
  loss = jax.jit(jax.value_and_grad(
      lambda a, b, m: adjax.angle_loss(a, b, m, None, 0.15, block_size=4), argnums=(0, 1)))
  for count in (1, 9, 19):
    labels = np.zeros(20, np.float32)
    labels[rng.permutation(20)[:count]] = 1
    value, grads = loss(e1, e2, labels)
    dense_value, dense_grads = _dense_angle(e1, e2, labels, 0.15)
    np.testing.assert_allclose(float(value), dense_value, rtol=1e-5)
    for got, want in zip(grads, dense_grads):
      np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
  assert loss._cache_size() == 1


def _dense_angle(e1, e2, labels, temp):
  """The loss of docs/method.md section 4 written densely in jax.numpy (a masked logsumexp)."""
  import jax.numpy as jnp

  def value(a, b):
    u = a / jnp.linalg.norm(a, axis=1, keepdims=True)
    v = b / jnp.linalg.norm(b, axis=1, keepdims=True)
    f = jnp.concatenate([u, v])
    lab = jnp.concatenate([labels, labels])
    sims = f @ f.T / temp
    lse = jax.nn.logsumexp(jnp.where(lab[:, None] != lab[None, :], sims, -jnp.inf), axis=1)
    pos = jnp.sum(u * v, axis=1) / temp
    return jnp.mean(lse - jnp.concatenate([pos, pos]))

  v, g = jax.value_and_grad(value, argnums=(0, 1))(e1, e2)
  return float(v), [np.asarray(x) for x in g]


def test_angle_loss_empty_sets_are_zero_with_zero_gradient():
  rng = np.random.default_rng(0)
  e1, e2 = rng.normal(size=(2, 20, 8)).astype(np.float32)
  for labels in (np.zeros(20), np.ones(20)):
    value, grad = jax.value_and_grad(adjax.angle_loss)(e1, e2, labels)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0)


def test_angle_loss_weights_drop_tokens():
  rng = np.random.default_rng(1)
  e1, e2 = rng.normal(size=(2, 30, 8)).astype(np.float32)
  labels = (rng.random(30) < 0.3).astype(np.float32)
  labels[:2] = [1, 0]
  keep = np.ones(30, np.float32)
  keep[20:] = 0
  # Padding rows hold garbage; they must not matter.
  noisy = e1.copy()
  noisy[20:] = 1e3
  weighted = adjax.angle_loss(noisy, e2, labels, weights=keep, block_size=8)
  plain = adjax.angle_loss(e1[:20], e2[:20], labels[:20])
  np.testing.assert_allclose(float(weighted), float(plain), rtol=1e-6)


@pytest.mark.parametrize("regime", ["mixed", "large", "nonormal_frac", "noanomaly"])
def test_norm_loss_golden(regime):
  d = np.load(FIXTURES / "norm_loss.npz")
  value, grad = jax.value_and_grad(jax.jit(adjax.norm_loss))(d[f"{regime}/features"],
                                                             d[f"{regime}/mask"])
  np.testing.assert_allclose(float(value), float(d[f"{regime}/loss"]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), d[f"{regime}/grad"], atol=1e-4, rtol=0)
  assert np.abs(np.asarray(grad) - d[f"{regime}/grad"]).max() < 1e-4 * max(
      1.0, np.abs(d[f"{regime}/grad"]).max())


def _norm_loss_numpy(features, labels):
  """Independent numpy transcription of docs/method.md section 4 with boolean indexing."""
  a = np.sqrt(np.linalg.norm(features, axis=1) + 1) - 1
  labels = labels.astype(bool)
  r_max = min(0.9 * a[labels].min(), 0.4) if labels.any() else 0.4
  r_min = 0.99 * r_max
  softplus = lambda z: np.log1p(np.exp(z))
  total = 0.0
  for sel, margin in [(~labels & (a > r_max), a - r_max), (~labels & (a < r_min), r_min - a),
                      (labels & (a < r_max + 0.75), r_max + 0.75 - a)]:
    if sel.any():
      total += np.mean(softplus(margin[sel]) * np.exp(margin[sel]))
  return total


def test_norm_loss_other_sizes_and_weights():
  rng = np.random.default_rng(2)
  for n, dim, scale in [(17, 5, 0.05), (100, 32, 0.02), (64, 8, 1.0)]:
    feats = (rng.normal(size=(n, dim)) * scale).astype(np.float32)
    labels = (rng.random(n) < 0.3).astype(np.float32)
    np.testing.assert_allclose(float(adjax.norm_loss(feats, labels)),
                               _norm_loss_numpy(feats.astype(np.float64), labels), rtol=1e-5)
    keep = (rng.random(n) < 0.7).astype(np.float32)
    np.testing.assert_allclose(float(adjax.norm_loss(feats, labels, weights=keep)),
                               _norm_loss_numpy(feats[keep > 0].astype(np.float64),
                                                labels[keep > 0]), rtol=1e-5)


def test_norm_loss_radius_carries_no_gradient():
  # With one anomalous token the radius depends on it; its gradient must come only from its
  # own "inside the boundary" term, never through r_max.
  feats = np.full((3, 2), 0.01, np.float32)
  feats[2] = 0.3
  labels = np.array([0, 0, 1], np.float32)
  grad = jax.grad(adjax.norm_loss)(feats, labels)
  a = np.sqrt(np.linalg.norm(feats[2]) + 1) - 1
  r_max = min(0.9 * a, 0.4)
  b = r_max + 0.75
  # d/dA [softplus(b - A) * const] = -sigmoid(b - A) * exp(b - A); dA/de = e / (2 |e| sqrt(|e|+1))
  norm = np.linalg.norm(feats[2])
  expected = (-(1 / (1 + np.exp(-(b - a)))) * np.exp(b - a) * feats[2]
              / (2 * norm * np.sqrt(norm + 1)))
  np.testing.assert_allclose(np.asarray(grad)[2], expected, rtol=1e-4)


@pytest.mark.torch
@pytest.mark.parametrize("share", [0.0, 0.1, 0.5])
def test_norm_loss_against_torch(share):
  torch = pytest.importorskip("torch")
  from torch_reference import norm_loss as torch_norm_loss
  rng = np.random.default_rng(int(share * 10))
  # Norms spread across the band so that every term has members.
  e = (rng.normal(size=(200, 12)) * rng.uniform(0.05, 0.5, size=(200, 1))).astype(np.float32)
  mask = (rng.random(200) < share).astype(np.float32)
  t = torch.tensor(e, requires_grad=True)
  ref = torch_norm_loss(t, torch.tensor(mask))
  ref.backward()
  value, grad = jax.value_and_grad(adjax.norm_loss)(e, mask)
  assert ref.item() > 0
  np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), t.grad.numpy(), atol=1e-6, rtol=1e-4)
