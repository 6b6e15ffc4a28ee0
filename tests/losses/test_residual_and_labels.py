"""Residual features and token labels: golden, blocking, per-image references, torch parity."""

import jax.numpy as jnp
import numpy as np
import pytest

import adjax
from conftest import FIXTURES


@pytest.mark.parametrize("max_similarities", [1 << 25, 64, 5])
def test_residual_golden(max_similarities):
  d = np.load(FIXTURES / "residual.npz")
  feats = d["features"].transpose(0, 2, 3, 1)
  residual, index = adjax.residual_features(jnp.asarray(feats), jnp.asarray(d["refs"]),
                                            max_similarities=max_similarities)
  np.testing.assert_array_equal(np.asarray(index), d["index"])
  np.testing.assert_allclose(np.asarray(residual), d["residual"].transpose(0, 2, 3, 1),
                             atol=1e-6)


def _nearest_numpy(feats, refs, valid):
  q = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  r = refs / np.linalg.norm(refs, axis=-1, keepdims=True)
  sims = np.where(valid, q @ r.T, -np.inf)
  return sims.argmax(-1)


@pytest.mark.parametrize("max_similarities", [1 << 20, 300, 1])
def test_residual_per_image_references_with_unused_shots(max_similarities):
  rng = np.random.default_rng(0)
  b, h, w, c, n = 3, 4, 5, 16, 50
  feats = rng.normal(size=(b, h, w, c)).astype(np.float32)
  refs = rng.normal(size=(b, n, c)).astype(np.float32)
  valid = np.ones((b, n), bool)
  valid[0, 10:] = False
  valid[2, 30:] = False
  # Duplicated best rows: the lowest index wins.
  refs[1, 40] = refs[1, 7]
  residual, index = adjax.residual_features(feats, refs, valid,
                                            max_similarities=max_similarities)
  for i in range(b):
    want = _nearest_numpy(feats[i].reshape(-1, c), refs[i], valid[i])
    np.testing.assert_array_equal(np.asarray(index[i]).ravel(), want)
    np.testing.assert_allclose(np.asarray(residual[i]).reshape(-1, c),
                               feats[i].reshape(-1, c) - refs[i][want], atol=1e-6)
  assert np.asarray(index[0]).max() < 10


def test_residual_bad_shapes():
  with pytest.raises(ValueError, match="refs must be"):
    adjax.residual_features(jnp.zeros((1, 2, 2, 4)), jnp.zeros((3, 5)))
  with pytest.raises(ValueError, match="features must be"):
    adjax.residual_features(jnp.zeros((2, 4)), jnp.zeros((3, 4)))


def test_token_labels_golden():
  d = np.load(FIXTURES / "patch_labels.npz")
  for masks in (d["masks"][:, 0], jnp.asarray(d["masks"][:, 0])):
    angle, nearest = adjax.token_labels(masks)
    np.testing.assert_array_equal(np.asarray(angle), d["labels"])
    np.testing.assert_array_equal(np.asarray(nearest), d["nearest"])


@pytest.mark.torch
@pytest.mark.parametrize("size, patch, threshold", [(112, 14, 32), (128, 16, 41), (64, 8, 10)])
def test_token_labels_against_torch(size, patch, threshold):
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F
  rng = np.random.default_rng(size)
  masks = np.zeros((4, size, size), np.float32)
  for m in masks:
    y, x = rng.integers(0, size - 20, 2)
    m[y:y + rng.integers(3, 20), x:x + rng.integers(3, 20)] = 1
  angle, nearest = adjax.token_labels(masks, patch_size=patch, threshold=threshold)
  t = torch.from_numpy(masks)[:, None]
  counts = F.avg_pool2d(t, patch) * patch * patch
  np.testing.assert_array_equal(angle, (counts[:, 0] > threshold).float().numpy())
  grid = size // patch
  np.testing.assert_array_equal(nearest, F.interpolate(t, size=(grid, grid),
                                                       mode="nearest")[:, 0].numpy())


def test_token_labels_bad_size():
  with pytest.raises(ValueError, match="multiple of patch_size"):
    adjax.token_labels(np.zeros((1, 30, 28)), patch_size=14)
