"""Downstream detectors on generated features with defects they must find (docs/method.md section
6).

Normal samples are a smooth random field shared by all images (the "object") plus small
noise; anomalous samples add a localized blob along a random direction. The shared pieces are
checked against PyTorch / scipy / brute force.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from adjax import metrics
from adjax.methods import METHODS, common, get_method, knn
from adjax.methods import cflow as cflow_lib
from adjax.methods import glass as glass_lib
from adjax.methods import padim as padim_lib

GRID = 8
IMAGE = 32


def make_data(seed, n, anomalous_frac=0.0, channels=(12, 12, 12, 12), amp=3.0, noise=0.1):
  """Levels (n, 8, 8, C), image labels (n,), token masks (n, 8, 8)."""
  rng = np.random.default_rng(seed)
  base = np.random.default_rng(1234)  # the object is the same for every call
  yy, xx = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
  labels = np.zeros(n, np.int32)
  labels[:int(round(n * anomalous_frac))] = 1
  cy, cx = rng.uniform(1, GRID - 2, n), rng.uniform(1, GRID - 2, n)
  bump = np.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2)
                / 2.0) * labels[:, None, None]
  levels = []
  for c in channels:
    fy, fx, ph = base.uniform(0, 0.6, c), base.uniform(0, 0.6, c), base.uniform(0, 6.3, c)
    field = np.cos(fy * yy[..., None] + fx * xx[..., None] + ph)
    x = field[None] + noise * rng.standard_normal((n, GRID, GRID, c))
    d = rng.standard_normal((n, c))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    levels.append((x + amp * bump[..., None] * d[:, None, None, :]).astype(np.float32))
  return levels, labels, (bump > 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def data():
  train, _, _ = make_data(0, 24)
  test, labels, token_masks = make_data(1, 24, 0.5)
  masks = np.kron(token_masks, np.ones((IMAGE // GRID, IMAGE // GRID)))
  return train, test, labels, masks


# ----------------------------------------------------------------------------- shared pieces


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("src,dst", [((5, 7), (32, 20)), ((16, 16), (224, 224)),
                                     ((9, 6), (4, 3))])
def test_resize_matches_torch(align, src, dst):
  x = np.random.default_rng(0).standard_normal((2,) + src).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x)[:, None], size=dst, mode="bilinear",
                       align_corners=align)[:, 0].numpy()
  got = np.asarray(common.resize_maps(jnp.asarray(x), dst, align_corners=align))
  np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("shape,sigma", [((40, 33), 4.0), ((10, 12), 4.0), ((16, 16), 1.5)])
def test_gaussian_blur_matches_scipy(shape, sigma):
  x = np.random.default_rng(1).standard_normal((2,) + shape).astype(np.float32)
  want = np.stack([scipy.ndimage.gaussian_filter(m.astype(np.float64), sigma) for m in x])
  got = np.asarray(common.gaussian_blur(jnp.asarray(x), sigma))
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("n_in,n_out", [(6912, 1024), (9216, 1024), (3072, 1024), (30, 7), (5, 5),
                                        (3, 8)])
def test_adaptive_pool_matches_torch(n_in, n_out):
  x = np.random.default_rng(2).standard_normal((3, n_in)).astype(np.float32)
  want = F.adaptive_avg_pool1d(torch.from_numpy(x)[:, None], n_out)[:, 0].numpy()
  np.testing.assert_allclose(np.asarray(common.adaptive_avg_pool(jnp.asarray(x), n_out)), want,
                             atol=1e-5)


def test_patch_aggregation_matches_torch_patchcore():
  """3x3 unfold, per-level pooling, resize to the first grid, stack, pool: as PatchCore."""
  rng = np.random.default_rng(3)
  levels = [rng.standard_normal((2, 6, 6, 20)).astype(np.float32),
            rng.standard_normal((2, 3, 3, 28)).astype(np.float32)]
  embed, target = 64, 48
  feats = []
  for x in levels:
    t = torch.from_numpy(x).permute(0, 3, 1, 2)  # (B, C, h, w)
    b, c, h, w = t.shape
    u = F.unfold(t, kernel_size=3, padding=1).reshape(b, c, 3, 3, h, w)
    u = u.permute(0, 4, 5, 1, 2, 3)  # (B, h, w, C, 3, 3)
    if (h, w) != (6, 6):
      u = u.permute(0, 3, 4, 5, 1, 2).reshape(-1, h, w)
      u = F.interpolate(u[:, None], size=(6, 6), mode="bilinear", align_corners=False)[:, 0]
      u = u.reshape(b, c, 3, 3, 6, 6).permute(0, 4, 5, 1, 2, 3)
    u = u.reshape(-1, c * 9)
    feats.append(F.adaptive_avg_pool1d(u[:, None], embed)[:, 0])
  stacked = torch.stack(feats, dim=1).reshape(len(feats[0]), 1, -1)
  want = F.adaptive_avg_pool1d(stacked, target)[:, 0].numpy().reshape(2, 6, 6, target)
  got = np.asarray(common.aggregate_levels([jnp.asarray(x) for x in levels], embed, target))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_nearest_neighbours_match_brute_force():
  rng = np.random.default_rng(4)
  bank = rng.standard_normal((1000, 24)).astype(np.float32)
  q = rng.standard_normal((130, 24)).astype(np.float32)
  d2 = ((q[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1)
  for k in (1, 3):
    dist, idx = knn.nearest_neighbours(jnp.asarray(q), jnp.asarray(bank), k=k, query_block=64,
                                       bank_block=300)
    want_idx = np.argsort(d2, axis=1)[:, :k]
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_allclose(np.asarray(dist), np.take_along_axis(d2, want_idx, 1),
                               rtol=1e-4, atol=1e-4)


def _greedy_numpy(x, starts, num):
  x = x.astype(np.float64)
  dist = np.linalg.norm(x[:, None] - x[starts][None], axis=-1).mean(1)
  chosen = []
  for _ in range(num):
    j = int(np.argmax(dist))
    chosen.append(j)
    dist = np.minimum(dist, np.linalg.norm(x - x[j], axis=1))
  return chosen


def test_greedy_coreset_matches_numpy_and_hits_every_cluster():
  rng = np.random.default_rng(5)
  pts = rng.standard_normal((400, 16)).astype(np.float32)
  starts = np.array([3, 77, 200])
  got = knn.greedy_coreset_from_starts(jnp.asarray(pts), jnp.asarray(starts), num=40,
                                       num_starts=3, block_size=128)
  assert list(np.asarray(got)) == _greedy_numpy(pts, starts, 40)
  # Well separated clusters: k-centre with k = number of clusters takes one from each.
  centres = rng.standard_normal((7, 200)) * 50
  which = rng.integers(0, 7, 700)
  clustered = (centres[which] + rng.standard_normal((700, 200))).astype(np.float32)
  idx = np.asarray(knn.greedy_coreset(jnp.asarray(clustered), 7, jax.random.key(0),
                                      projection_dim=32))
  assert sorted(which[idx]) == list(range(7))


# ----------------------------------------------------------------------------- detectors


def test_registry():
  assert set(METHODS) == {"featurenorm", "patchcore", "padim", "cflow", "uniad", "glass"}
  with pytest.raises(ValueError, match="choose one of"):
    get_method("patchkore")
  with pytest.raises(ValueError, match="coreset_ratio"):
    get_method("patchcore", coreset_rate=0.1)
  with pytest.raises(ValueError, match="list of"):
    get_method("padim").fit(np.zeros((2, 4, 4, 3)), None)


def test_patchcore_finds_defects_and_scores_by_nearest_bank_vector(data):
  train, test, labels, masks = data
  method = get_method("patchcore", coreset_ratio=0.25, embed_dim=32, target_dim=32)
  state = method.fit(train, jax.random.key(0))
  assert state["bank"].shape == (int(24 * 64 * 0.25), 32)
  scores, maps = method.score(state, test, IMAGE)
  assert maps.shape == (24, IMAGE, IMAGE)
  assert metrics.image_metrics(labels, np.asarray(scores))["auroc"] > 0.9
  # Token scores: squared distance to the nearest bank vector, by brute force.
  feats = np.asarray(method.embed(test)).reshape(-1, 32).astype(np.float64)
  bank = np.asarray(state["bank"], np.float64)
  tok = ((feats[:, None] - bank[None]) ** 2).sum(-1).min(1).reshape(24, -1)
  np.testing.assert_allclose(np.asarray(scores), tok.max(1), rtol=1e-4, atol=1e-5)
  up = F.interpolate(torch.from_numpy(tok.reshape(24, 1, GRID, GRID)), size=IMAGE,
                     mode="bilinear", align_corners=False)[:, 0].numpy()
  want = np.stack([scipy.ndimage.gaussian_filter(m, 4) for m in up])
  np.testing.assert_allclose(np.asarray(maps), want, rtol=1e-4, atol=1e-5)


def test_padim_finds_defects_and_matches_mahalanobis(data):
  train, test, labels, masks = data
  method = get_method("padim", position_block=24)
  state = method.fit(train, None)
  scores, maps = method.score(state, test, IMAGE)
  assert metrics.image_metrics(labels, np.asarray(scores))["auroc"] > 0.9
  # Level 3's distances with an explicit inverse (as the reference), position by position.
  x = train[2].reshape(24, 64, -1).astype(np.float64)
  t = test[2].reshape(24, 64, -1).astype(np.float64)
  want = np.empty((24, 64))
  for l in range(64):
    cov = np.cov(x[:, l], rowvar=False) + 0.01 * np.eye(x.shape[-1])
    d = t[:, l] - x[:, l].mean(0)
    want[:, l] = np.sqrt(np.einsum("mc,cd,md->m", d, np.linalg.inv(cov), d))
  got = np.asarray(padim_lib.mahalanobis(jnp.asarray(t, jnp.float32), state["mean"][2],
                                          state["chol"][2], 24))
  np.testing.assert_allclose(got, want, rtol=2e-3)


def _cosine_residual(features, refs):
  """Independent residual: subtract each token's most cosine-similar reference token."""
  f = features.reshape(-1, features.shape[-1])
  fn = f / np.linalg.norm(f, axis=1, keepdims=True)
  rn = refs / np.linalg.norm(refs, axis=1, keepdims=True)
  return (f - refs[np.argmax(fn @ rn.T, axis=1)]).reshape(features.shape)


def test_featurenorm_on_residuals_finds_defects(data):
  train, test, labels, masks = data
  refs = [x[:8].reshape(-1, x.shape[-1]) for x in train]  # 8 reference shots
  residual = [_cosine_residual(x, r) for x, r in zip(test, refs)]
  method = get_method("featurenorm")
  scores, maps = method.score(method.fit(None), residual, IMAGE)
  assert metrics.image_metrics(labels, np.asarray(scores))["auroc"] > 0.9
  # The map: mean over levels of the align-corners upsampled sqrt(|e| + 1) - 1, smoothed.
  ups = [F.interpolate(torch.from_numpy(np.sqrt(np.linalg.norm(r, axis=-1) + 1) - 1)[:, None],
                       size=IMAGE, mode="bilinear", align_corners=True)[:, 0].numpy()
         for r in residual]
  want = np.stack([scipy.ndimage.gaussian_filter(m, 4) for m in np.mean(ups, axis=0)])
  np.testing.assert_allclose(np.asarray(maps), want, rtol=1e-4, atol=1e-5)


def _defect_contrast(maps, labels, masks):
  maps = np.asarray(maps)[labels == 1]
  m = masks[labels == 1] > 0
  assert np.all(np.isfinite(maps))
  return maps[m].mean(), maps[~m].mean()


def test_cflow_trains_and_ranks_defects(data, caplog):
  train, test, labels, masks = data
  method = get_method("cflow", coupling_blocks=2, cond_dim=8, epochs=2, fiber_batch=128)
  state = method.fit(train, jax.random.key(0))
  assert "never leaves its warm-up" in caplog.text   # 2 epochs < 2 meta-epochs of 8
  assert np.isfinite(float(state["loss"]))
  scores, maps = method.score(state, test, IMAGE)
  inside, outside = _defect_contrast(maps, labels, masks)
  assert inside > outside
  # The reference's test-set normalisation: exp(log p - max), upsampled, summed, inverted.
  total = sum(F.interpolate(torch.from_numpy(np.exp(np.float64(lp) - np.max(lp)))[:, None],
                            size=IMAGE, mode="bilinear", align_corners=True)[:, 0].numpy()
              for lp in map(np.asarray, method.log_likelihood(state, test)))
  np.testing.assert_allclose(np.asarray(maps), total.max() - total, atol=1e-5)
  np.testing.assert_allclose(np.asarray(scores), (total.max() - total).max(axis=(1, 2)),
                             atol=1e-5)
  # log|det J| of the flow equals the log-determinant of its Jacobian (autodiff).
  p = state["params"][0]
  x = jnp.asarray(test[-1][0, 0, :2])
  c = jnp.ones((2, 8))
  f = lambda v: cflow_lib.flow_forward(p, state["perms"][0], v[None], c[:1], 1.9)[0][0]
  _, logdet = cflow_lib.flow_forward(p, state["perms"][0], x[:1], c[:1], 1.9)
  jac = jax.jacfwd(f)(x[0])
  np.testing.assert_allclose(float(logdet[0]), np.linalg.slogdet(np.asarray(jac))[1],
                             rtol=1e-4, atol=1e-4)


def _reference_cflow_rates(cfg, batches):
  """The reference's per-batch learning rate, written as its loop sets it: adjust_learning_rate
  at each meta-epoch's start, then warmup_learning_rate before every image batch."""
  meta_epochs = cfg.epochs // cfg.sub_epochs
  eta = cfg.lr * 0.1 ** 3
  cosine = lambda m: eta + (cfg.lr - eta) * (1 + math.cos(math.pi * m / meta_epochs)) / 2
  warm_to = cosine(cfg.warmup_meta_epochs)
  out = []
  for epoch in range(meta_epochs):
    lr = cosine(epoch)
    for sub in range(cfg.sub_epochs):
      for i in range(batches):
        if epoch < cfg.warmup_meta_epochs:
          p = (i + sub * batches + epoch * batches * cfg.sub_epochs) / (
              cfg.warmup_meta_epochs * batches * cfg.sub_epochs)
          lr = cfg.lr / 10 + p * (warm_to - cfg.lr / 10)
        out.append(lr)
  return np.array(out)


@pytest.mark.parametrize("settings,batches", [
    (dict(), 3),                                                # the reference's 25 x 8
    (dict(epochs=4, sub_epochs=2, warmup_meta_epochs=1), 2),
])
def test_cflow_learning_rates_are_the_references(settings, batches):
  cfg = cflow_lib.CFlow(**settings)
  np.testing.assert_allclose(cfg.learning_rates(batches), _reference_cflow_rates(cfg, batches),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="sub_epochs must be >= 1"):
    cflow_lib.CFlow(sub_epochs=0).learning_rates(batches)


def test_cflow_trains_as_the_reference_loop():
  """Per image batch of a shuffled epoch (the last partial batch dropped) and per level, the
  batch's tokens are permuted and cut into fibre batches, each one Adam step of that level's
  flow alone, at the batch's learning rate: recomputed here step by step with torch's Adam
  written out in numpy."""
  rng = np.random.default_rng(0)
  levels = [rng.standard_normal((10, 4, 4, 6)).astype(np.float32),
            rng.standard_normal((10, 2, 2, 6)).astype(np.float32)]
  cfg = cflow_lib.CFlow(num_levels=None, coupling_blocks=2, cond_dim=8, epochs=4,
                        sub_epochs=2, warmup_meta_epochs=1, image_batch=4, fiber_batch=24)
  key = jax.random.key(5)
  state = cfg.fit(levels, key)
  k_init, k_train = jax.random.split(key)
  params = [jax.tree.map(np.asarray, p) for p in cfg.init(k_init, [6, 6])["params"]]
  perms = state["perms"]
  moments = [[jax.tree.map(np.zeros_like, p), jax.tree.map(np.zeros_like, p), 0]
             for p in params]
  grad = jax.jit(jax.grad(cflow_lib.fibre_loss), static_argnums=4)
  positions = [common.sinusoidal_position_2d(8, x.shape[1], x.shape[2]).reshape(-1, 8)
               for x in levels]
  rates = _reference_cflow_rates(cfg, 2)   # 10 images in batches of 4: 2 batches an epoch
  steps = [0, 0]
  orders = []
  for g in range(4 * 2):
    images, fibres = cflow_lib.fibre_draws(cfg, k_train, jnp.int32(g), 10, [16, 4])
    images = np.asarray(images)
    if g % 2 == 0:
      seen = set()
      orders.append([])
    orders[-1] += images.tolist()
    assert not seen & set(images.tolist()) and len(set(images.tolist())) == 4
    seen |= set(images.tolist())
    # Level 1: 64 tokens -> 2 fibres of 24 (16 dropped); level 2: 16 tokens -> 1 fibre of 16.
    assert [np.asarray(f).shape for f in fibres] == [(2, 24), (1, 16)]
    for k, (x, pos, fib) in enumerate(zip(levels, positions, fibres)):
      fib = np.asarray(fib)
      assert len(set(fib.ravel().tolist())) == fib.size and fib.max() < 4 * pos.shape[0]
      tokens = x[images].reshape(-1, 6)
      for f in fib:
        gr = grad(params[k], perms[k], tokens[f], pos[f % pos.shape[0]], 1.9)
        m, v, t = moments[k]
        t += 1
        m = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * np.asarray(b), m, gr)
        v = jax.tree.map(lambda a, b: 0.999 * a + 0.001 * np.asarray(b) ** 2, v, gr)
        params[k] = jax.tree.map(
            lambda p, a, b: p - rates[g] * (a / (1 - 0.9 ** t)) / (
                np.sqrt(b / (1 - 0.999 ** t)) + 1e-8), params[k], m, v)
        moments[k] = [m, v, t]
        steps[k] += 1
  assert steps == [16, 8]
  assert len({tuple(order) for order in orders}) == 4     # a new order every epoch
  for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-6)


def test_cflow_scores_keep_double_precision():
  from adjax.methods.cflow import _maps_from_log_likelihood
  # Three images on a 2 x 2 grid: a normal one, and two whose worst tokens sit 20 and 27
  # nats below the best: max - sum differs by ~1e-9 and ~1e-12, which float32 cannot hold.
  lp = np.zeros((3, 2, 2))
  lp[1, 0, 0], lp[2, 0, 0] = -20.0, -27.0
  scores, maps = _maps_from_log_likelihood([jnp.asarray(lp, jnp.float32)], (2, 2), 0.0)
  assert scores.dtype == np.float64 and maps.dtype == np.float32
  assert scores[2] > scores[1] > scores[0]
  np.testing.assert_allclose(scores[1:], 1.0 - np.exp([-20.0, -27.0]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name,settings,every,checks", [
    ("cflow", dict(coupling_blocks=2, cond_dim=8, epochs=5, fiber_batch=512), 2, [2, 4, 5]),
    ("glass", dict(embed_dim=12, target_dim=12, hidden=16, epochs=4, batch_size=8,
                   ascent_steps=2), 2, [2, 4]),
])
def test_training_in_rounds_is_training_at_once(data, name, settings, every, checks):
  """The states yielded on the way (for the reference's test-every-epoch protocol) continue
  one another: the last equals one uninterrupted fit."""
  train = data[0]
  method = get_method(name, **settings)
  extra = {}
  if name == "glass":   # given texture anomalies: the same check, a smaller program to compile
    # Two copies of each of the 24 training images: the paired path (texture_batch).
    extra = {"synthetic_levels": make_data(2, 48, 0.5)[0],
             "synthetic_masks": (np.random.default_rng(0).uniform(size=(48, GRID, GRID)) > 0.7)}
  rounds = list(method.fit_in_rounds(train, jax.random.key(3), every=every, **extra))
  assert [r["epochs"] for r in rounds] == checks
  whole = method.fit(train, jax.random.key(3), **extra)
  for got, want in zip(jax.tree.leaves(rounds[-1]["params"]), jax.tree.leaves(whole["params"])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  first = jax.tree.leaves(rounds[0]["params"])[0]
  assert not np.allclose(np.asarray(first), np.asarray(jax.tree.leaves(whole["params"])[0]))
  with pytest.raises(ValueError, match="every must be >= 1"):
    next(method.fit_in_rounds(train, jax.random.key(3), every=0))
  with pytest.raises(ValueError, match=f"{name}: epochs must be >= 1, got 0"):
    get_method(name, **dict(settings, epochs=0)).fit(train, jax.random.key(3))


def test_glass_refreshed_texture_sets_follow_one_another(data):
  """With synthetic_refresh, epochs s R .. s R + R - 1 use set s of R copies per image: the
  same training as one given layout of all sets (copy e of it is copy e mod R of set e // R),
  in rounds or at once; each set is asked for once, when training reaches it."""
  train = data[0]
  method = get_method("glass", embed_dim=12, target_dim=12, hidden=16, epochs=4, batch_size=8,
                      ascent_steps=2)
  sets = [(make_data(2 + s, 48, 0.5)[0],
           np.random.default_rng(s).uniform(size=(48, GRID, GRID)) > 0.7) for s in range(2)]
  asked = []
  refresh = lambda s: asked.append(s) or sets[s]
  rounds = list(method.fit_in_rounds(train, jax.random.key(3), every=3,
                                     synthetic_levels=sets[0][0], synthetic_masks=sets[0][1],
                                     synthetic_refresh=refresh))
  assert [r["epochs"] for r in rounds] == [3, 4] and asked == [1]
  laid_out = method.fit(train, jax.random.key(3),
                        synthetic_levels=[np.concatenate(z) for z in zip(sets[0][0], sets[1][0])],
                        synthetic_masks=np.concatenate([sets[0][1], sets[1][1]]))
  for got, want in zip(jax.tree.leaves(rounds[-1]["params"]),
                       jax.tree.leaves(laid_out["params"])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  # Without the refresh the first set's copies come back in epochs 2 and 3: another result.
  repeated = method.fit(train, jax.random.key(3), synthetic_levels=sets[0][0],
                        synthetic_masks=sets[0][1])
  assert not np.allclose(np.asarray(jax.tree.leaves(repeated["params"])[0]),
                         np.asarray(jax.tree.leaves(laid_out["params"])[0]))
  with pytest.raises(ValueError, match="synthetic_refresh needs synthetic_levels with R copies"):
    method.fit(train, jax.random.key(3), synthetic_refresh=refresh)
  with pytest.raises(ValueError, match=r"synthetic_refresh\(1\) gave features of shape"):
    method.fit(train, jax.random.key(3), synthetic_levels=sets[0][0],
               synthetic_masks=sets[0][1],
               synthetic_refresh=lambda s: ([x[:24] for x in sets[1][0]], sets[1][1][:24]))


def test_uniad_trains_on_several_classes_and_ranks_defects(data):
  train, test, labels, masks = data
  method = get_method("uniad", hidden_dim=16, ffn_dim=32, num_heads=2, encoder_layers=1,
                      decoder_layers=1, epochs=3, batch_size=8, neighbour_size=3)
  # Two "classes" given as a list of per-class levels.
  state = method.fit([[x[:12] for x in train], [x[12:] for x in train]], jax.random.key(0))
  assert np.isfinite(float(state["loss"]))
  scores, maps = method.score(state, test, IMAGE)
  inside, outside = _defect_contrast(maps, labels, masks)
  assert inside > outside
  # Map = upsampled L2 reconstruction error (independent: torch upsampling + scipy blur).
  x, rec = method.reconstruct(state, test)
  err = np.sqrt(((np.asarray(rec) - np.asarray(x)) ** 2).sum(-1))
  up = F.interpolate(torch.from_numpy(err)[:, None], size=IMAGE, mode="bilinear",
                     align_corners=True)[:, 0].numpy()
  np.testing.assert_allclose(np.asarray(maps), up, rtol=1e-4, atol=1e-4)   # unsmoothed


def test_uniad_neighbour_mask_hides_the_window():
  from adjax.methods.uniad import neighbour_mask
  m = neighbour_mask(5, 6, 3)
  for i in range(30):
    for j in range(30):   # visible: outside the 3 x 3 window around the query, itself hidden
      assert m[i, j] == (abs(i // 6 - j // 6) > 1 or abs(i % 6 - j % 6) > 1)
  with pytest.raises(ValueError, match="neighbour_size 7 hides every key of a 4 x 4 grid"):
    neighbour_mask(4, 4, 7)


def _torch_uniad_transformer(params, heads, mask, drop=None):
  """UniAD's transformer written with torch.nn (sequence-first, post-norm), from the paper's
  and its code's architecture, loaded with adjax's parameters.

  drop: None (eval) or a function applied where UniAD's layers apply dropout (attention weights
  (B, heads, L_q, L_k) inside every attention, then dropout1/2/3 and the FFN's), in its order;
  with it the attention is written out, as torch.nn.MultiheadAttention takes no mask function.
  """
  t = lambda a: torch.from_numpy(np.array(a, np.float32))

  def mha(p):
    d = p["q"]["w"].shape[0]
    m = torch.nn.MultiheadAttention(d, heads)
    with torch.no_grad():
      m.in_proj_weight.copy_(torch.cat([t(p[k]["w"]).T for k in "qkv"]))
      m.in_proj_bias.copy_(torch.cat([t(p[k]["b"]) for k in "qkv"]))
      m.out_proj.weight.copy_(t(p["o"]["w"]).T)
      m.out_proj.bias.copy_(t(p["o"]["b"]))
    if drop is None:
      return m

    def attend(q, k, v, attn_mask):          # (L, B, C) each
      length, batch, d = q.shape
      heads_of = lambda x, j: (x @ m.in_proj_weight[j * d:(j + 1) * d].T
                               + m.in_proj_bias[j * d:(j + 1) * d]).reshape(
                                   x.shape[0], batch, heads, d // heads).permute(1, 2, 0, 3)
      logits = heads_of(q, 0) @ heads_of(k, 1).transpose(-1, -2) / math.sqrt(d // heads)
      weights = drop(torch.softmax(logits + attn_mask, -1))
      out = (weights @ heads_of(v, 2)).permute(2, 0, 1, 3).reshape(length, batch, d)
      return (m.out_proj(out),)
    return attend

  def norm(p):
    return lambda x: F.layer_norm(x, x.shape[-1:], t(p["scale"]), t(p["bias"]))

  def linear(p):
    return lambda x: x @ t(p["w"]) + t(p["b"])

  h, w = params["row_embed"].shape[0], params["col_embed"].shape[0]
  row, col = t(params["row_embed"]), t(params["col_embed"])
  pos = torch.cat([col[None].repeat(h, 1, 1), row[:, None].repeat(1, w, 1)], -1)
  pos = pos.reshape(h * w, 1, -1)
  attn_mask = torch.zeros(mask.shape).masked_fill(torch.from_numpy(~mask), float("-inf"))

  d = (lambda x: x) if drop is None else drop

  def forward(tokens):                       # (L, B, C)
    src = linear(params["in_proj"])(tokens)
    for p in params["encoder"]:
      q = src + pos
      src = norm(p["n1"])(src + d(mha(p["attn"])(q, q, src, attn_mask=attn_mask)[0]))
      ff = linear(p["ff2"])(d(torch.relu(linear(p["ff1"])(src))))
      src = norm(p["n2"])(src + d(ff))
    memory, out = src, src
    for p in params["decoder"]:
      tgt = t(p["queries"])[:, None].repeat(1, tokens.shape[1], 1)
      tgt = norm(p["n1"])(tgt + d(mha(p["memory_attn"])(tgt + pos, memory + pos, memory,
                                                          attn_mask=attn_mask)[0]))
      tgt = norm(p["n2"])(tgt + d(mha(p["previous_attn"])(tgt + pos, out + pos, out,
                                                            attn_mask=attn_mask)[0]))
      ff = linear(p["ff2"])(d(torch.relu(linear(p["ff1"])(tgt))))
      out = norm(p["n3"])(tgt + d(ff))
    return linear(params["out_proj"])(norm(params["decoder_norm"])(out))

  return forward


def test_uniad_transformer_matches_torch():
  from adjax.methods.uniad import _forward, neighbour_mask
  method = get_method("uniad", hidden_dim=16, ffn_dim=24, num_heads=2, encoder_layers=2,
                      decoder_layers=2, neighbour_size=3)
  h, w, c = 5, 6, 7
  params = method.init(jax.random.key(0), h, w, c)
  # Biases and norms away from their zero/one init, so that every parameter is exercised.
  gen = np.random.default_rng(1)
  params = jax.tree.map(lambda a: a + 0.1 * gen.standard_normal(a.shape).astype(np.float32),
                        params)
  tokens = gen.standard_normal((3, h * w, c)).astype(np.float32)
  got = np.asarray(_forward(method, params, jnp.asarray(tokens)))
  forward = _torch_uniad_transformer(params, 2, neighbour_mask(h, w, 3))
  with torch.no_grad():
    want = forward(torch.from_numpy(tokens).transpose(0, 1)).transpose(0, 1).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  # Dropout where UniAD has it: the same fixed masks at the same sites, in the same order.
  def masks(layout_of):
    shapes = []
    def apply(x):
      shape = layout_of(tuple(x.shape))
      keep = np.random.default_rng(len(shapes)).uniform(size=shape) > 0.3
      shapes.append(shape)
      scale = (keep / 0.7).astype(np.float32)
      if isinstance(x, torch.Tensor):
        return x * (torch.from_numpy(scale).transpose(0, 1) if x.dim() == 3
                    else torch.from_numpy(scale))
      return x * scale
    return apply, shapes
  jax_drop, jax_sites = masks(lambda s: s)
  torch_drop, torch_sites = masks(lambda s: (s[1], s[0], s[2]) if len(s) == 3 else s)
  got = np.asarray(_forward(method, params, jnp.asarray(tokens), jax_drop))
  forward = _torch_uniad_transformer(params, 2, neighbour_mask(h, w, 3), torch_drop)
  with torch.no_grad():
    want = forward(torch.from_numpy(tokens).transpose(0, 1)).transpose(0, 1).numpy()
  assert jax_sites == torch_sites and len(jax_sites) == 2 * 4 + 2 * 6
  assert not np.allclose(got, np.asarray(_forward(method, params, jnp.asarray(tokens))))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_uniad_feature_jitter_is_drawn_per_batch():
  from adjax.methods.uniad import _jitter
  gen = np.random.default_rng(0)
  tokens = jnp.asarray(gen.standard_normal((4, 30, 64)) * gen.uniform(1, 5, (4, 30, 1)),
                       jnp.float32)
  method = get_method("uniad", jitter_scale=20.0, jitter_prob=0.5)
  applied = []
  for seed in range(40):
    changed = np.asarray(jnp.any(_jitter(method, jax.random.key(seed), tokens) != tokens,
                                 axis=(1, 2)))
    assert changed.all() or not changed.any()      # the whole batch or none of it
    applied.append(changed.all())
  assert 10 < sum(applied) < 30
  # Noise of scale |f| / C * jitter_scale, per token.
  always = get_method("uniad", jitter_scale=20.0, jitter_prob=1.0)
  noise = np.asarray(_jitter(always, jax.random.key(0), tokens) - tokens)
  scale = np.linalg.norm(np.asarray(tokens), axis=-1, keepdims=True) / 64 * 20.0
  assert abs((noise / scale).std() - 1.0) < 0.05


def test_uniad_dropout_trains_only(monkeypatch):
  from adjax.methods import uniad as uniad_lib
  x = jnp.ones((200, 50))
  dropped = np.asarray(uniad_lib._Dropout(jax.random.key(0), 0.1)(x))
  assert set(np.unique(dropped)) == {0.0, np.float32(1 / 0.9)}
  assert abs((dropped == 0).mean() - 0.1) < 0.01
  # The training step draws dropout at every site (traced, not compiled: 4 sites an encoder
  # layer, 6 a decoder layer); with dropout 0 it draws none; scoring never does.
  calls = []
  class Counted(uniad_lib._Dropout):
    def __call__(self, x):
      calls.append(x.shape)
      return super().__call__(x)
  monkeypatch.setattr(uniad_lib, "_Dropout", Counted)
  settings = dict(hidden_dim=8, ffn_dim=16, num_heads=2, encoder_layers=1, decoder_layers=2,
                  neighbour_size=3)
  tokens = jnp.zeros((4, 4, 4, 6))
  for rate, sites in ((0.1, 4 + 2 * 6), (0.0, 0)):
    method = get_method("uniad", dropout=rate, **settings)
    params = method.init(jax.random.key(0), 4, 4, 6)
    calls.clear()
    uniad_lib._train.lower(method, tokens, params, jax.random.key(1), 3)
    assert len(calls) == sites
  calls.clear()
  uniad_lib._reconstruct.lower(get_method("uniad", **settings), params, tokens)
  assert not calls
  for rate in (1.0, -0.1):
    with pytest.raises(ValueError, match=r"uniad: dropout must be in \[0, 1\)"):
      get_method("uniad", dropout=rate, **settings).init(jax.random.key(0), 4, 4, 6)


def test_glass_trains_and_ranks_defects(data):
  train, test, labels, masks = data
  # The reference's recipe at toy size; the discriminator needs some hundreds of steps here
  # because true and Gaussian tokens are nearly indistinguishable by design and the texture
  # anomalies are held to the [2r, 4r] shell.
  method = get_method("glass", embed_dim=24, target_dim=24, hidden=64, epochs=200, batch_size=4,
                      ascent_steps=5, lr=1e-3, dsc_lr=5e-3)
  state = method.fit(train, jax.random.key(0))
  assert np.isfinite(float(state["loss"]))
  scores, maps = method.score(state, test, IMAGE)
  inside, outside = _defect_contrast(maps, labels, masks)
  assert inside > outside + 0.05
  assert metrics.image_metrics(labels, np.asarray(scores))["auroc"] > 0.9


def _glass_tokens(seed, b=3, hw=(2, 3), d=6):
  """True and texture tokens (T, D), their per-position centres tiled (T, D), texture mask."""
  gen = np.random.default_rng(seed)
  L = hw[0] * hw[1]
  centre = gen.standard_normal((L, d)).astype(np.float32)
  tiled = np.tile(centre, (b, 1))
  u = gen.standard_normal((b * L, d))
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  true = tiled + u * gen.uniform(0.2, 3.0, (b * L, 1))
  v = gen.standard_normal((b * L, d))
  v /= np.linalg.norm(v, axis=1, keepdims=True)
  mask = gen.uniform(size=b * L) < 0.4
  # Texture tokens: near the centre outside the mask, far (some beyond 4 r) inside it.
  fake = tiled + v * np.where(mask, gen.uniform(2.0, 30.0, b * L),
                              gen.uniform(0.2, 3.0, b * L))[:, None]
  return [jnp.asarray(a, jnp.float32) for a in (true, fake, tiled)], mask


def test_glass_synthesis_shells_radius_and_gradient():
  (true, fake, c), mask = _glass_tokens(0)
  cfg = get_method("glass", target_dim=6, hidden=8, ascent_steps=5, noise_std=0.05)
  params = cfg.init(jax.random.key(1))
  dsc, stats = params["params"]["dsc"], params["stats"]
  key = jax.random.key(2)
  w = jax.random.normal(jax.random.key(3), true.shape)

  def synthesize(t):
    out = glass_lib._synthesize(cfg, dsc, stats, t, fake, jnp.asarray(mask), c, key)
    return jnp.sum(w * out[0]), out

  # One compilation gives the anomalies and the gradient of <w, gaussian anomalies>.
  (_, (gaus, moved, r, new_stats)), grad = jax.jit(
      jax.value_and_grad(synthesize, has_aux=True))(true)
  # r: the 0.75 quantile (torch's linear rule) over true tokens and unmasked texture tokens.
  dist = lambda f: np.linalg.norm(np.asarray(f) - np.asarray(c), axis=1)
  want_r = np.quantile(np.concatenate([dist(fake)[~mask], dist(true)]), 0.75)
  np.testing.assert_allclose(float(r), want_r, rtol=1e-5)
  # Gaussian anomalies end in [r, 2r] around their own position's centre (the last ascent step
  # is followed by a projection); masked texture tokens in [2r, 4r], on their own ray.
  dg = dist(gaus)
  assert np.all(dg >= r * (1 - 1e-5)) and np.all(dg <= 2 * r * (1 + 1e-5))
  df = dist(moved)
  assert np.all(df[mask] >= 2 * r * (1 - 1e-5)) and np.all(df[mask] <= 4 * r * (1 + 1e-5))
  np.testing.assert_array_equal(np.asarray(moved)[~mask], np.asarray(fake)[~mask])
  dirs = lambda f: (np.asarray(f) - np.asarray(c)) / dist(f)[:, None]
  np.testing.assert_allclose(dirs(moved)[mask], dirs(fake)[mask], atol=1e-5)
  # Every ascent pass updated the BatchNorm running statistics.
  assert not np.allclose(np.asarray(new_stats["mean"]), np.asarray(stats["mean"]))
  # Gradients reach the true tokens through the Gaussian anomalies: identity where the shell
  # projection did not clamp, orthogonal to the ray where it did.
  grad = np.asarray(grad)
  clamped = (np.abs(dg - float(r)) < 1e-4) | (np.abs(dg - 2 * float(r)) < 1e-4)
  assert clamped.any() and (~clamped).any()
  np.testing.assert_allclose(grad[~clamped], np.asarray(w)[~clamped], atol=1e-5)
  np.testing.assert_allclose(np.sum(grad * dirs(gaus), axis=1)[clamped], 0.0, atol=1e-5)


def test_glass_centre_is_per_position_training_mean():
  cfg = get_method("glass", target_dim=6, hidden=8)
  p = cfg.init(jax.random.key(0))["params"]
  x = np.random.default_rng(0).standard_normal((5, 2, 3, 6)).astype(np.float32)
  got = np.asarray(glass_lib._centre(cfg, p, jnp.asarray(x)))
  proj = x.reshape(5, 6, 6) @ np.asarray(p["proj"]["w"]) + np.asarray(p["proj"]["b"])
  np.testing.assert_allclose(got, proj.mean(0), atol=1e-5)


def test_glass_hard_mining_matches_reference_focal():
  gen = np.random.default_rng(0)
  n = 40
  scores = gen.uniform(0.02, 0.98, n)
  y = (gen.uniform(size=n) < 0.3).astype(np.float64)
  cfg = get_method("glass")
  got = float(glass_lib._mined_focal(cfg, jnp.asarray(np.log(scores / (1 - scores)),
                                                      jnp.float32), jnp.asarray(y, jnp.float32)))
  # The reference: keep the tokens whose (D - m)^2 is at least its median, then FocalLoss
  # (gamma 2, smooth 1e-5) on [1 - D, D].
  s, m = torch.from_numpy(scores)[:, None], torch.from_numpy(y)[:, None]
  err = (s - m) ** 2
  keep = err >= torch.quantile(err, q=0.5)
  assert int(keep.sum()) == n // 2  # exactly the hardest half
  s_, m_ = s[keep], m[keep]
  one_hot = torch.clamp(F.one_hot(m_.long(), 2).double(), 1e-5, 1 - 1e-5)
  pt = (one_hot * torch.stack([1 - s_, s_], 1)).sum(1) + 1e-5
  want = float((-(1 - pt) ** 2 * pt.log()).mean())
  np.testing.assert_allclose(got, want, rtol=1e-4)
  all_tokens = float(glass_lib._mined_focal(
      get_method("glass", mining_quantile=0.0), jnp.asarray(np.log(scores / (1 - scores)),
                                                            jnp.float32),
      jnp.asarray(y, jnp.float32)))
  assert all_tokens < got  # the easy half lowers the mean


def test_glass_optimizers_match_torch():
  cfg = get_method("glass")
  assert (cfg.lr, cfg.proj_weight_decay, cfg.dsc_lr, cfg.dsc_weight_decay) == (
      1e-4, 1e-5, 2e-4, 0.01)
  # Large decays and rates make coupled (Adam's L2) and decoupled (AdamW) decay visible.
  cfg = get_method("glass", lr=0.05, proj_weight_decay=0.3, dsc_lr=0.05, dsc_weight_decay=0.3)
  gen = np.random.default_rng(0)
  params = {"proj": {"w": gen.standard_normal((3, 3))}, "dsc": {"w": gen.standard_normal(4)}}
  grads = [jax.tree.map(lambda a: gen.standard_normal(a.shape), params) for _ in range(3)]
  to_j = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  opt = glass_lib._optimizer(cfg, to_j(params))
  p, state = to_j(params), opt.init(to_j(params))
  update = jax.jit(opt.update)
  for g in grads:
    u, state = update(to_j(g), state, p)
    p = optax.apply_updates(p, u)
  tp = {k: torch.nn.Parameter(torch.from_numpy(v["w"].copy())) for k, v in params.items()}
  topt = [torch.optim.Adam([tp["proj"]], lr=0.05, weight_decay=0.3),
          torch.optim.AdamW([tp["dsc"]], lr=0.05, weight_decay=0.3)]
  for g in grads:
    for k in tp:
      tp[k].grad = torch.from_numpy(g[k]["w"].copy())
    for o in topt:
      o.step()
  for k in tp:
    np.testing.assert_allclose(np.asarray(p[k]["w"]), tp[k].detach().numpy(), atol=1e-5)


def test_glass_epoch_cap():
  cfg = get_method("glass")
  assert cfg.epoch_steps(1000) == 50  # the reference stops once more than 392 images are seen
  assert cfg.epoch_steps(200) == 25
  assert get_method("glass", limit=None).epoch_steps(1000) == 125
  assert get_method("glass", batch_size=8, limit=0).epoch_steps(1000) == 1


def test_glass_texture_batch_is_the_true_batchs_copies():
  """With R copies of each of N training images (copy r of image i at r * N + i), a step's
  textured images are its true batch's, copy epoch mod R; otherwise a uniform draw."""
  batch = jnp.array([4, 0, 7])
  key = jax.random.key(0)
  for epoch, copy in ((0, 0), (1, 1), (2, 2), (3, 0), (7, 1)):
    np.testing.assert_array_equal(
        np.asarray(glass_lib.texture_batch(key, batch, jnp.int32(epoch), 8, 24)),
        copy * 8 + np.array([4, 0, 7]))
  drawn = np.asarray(glass_lib.texture_batch(key, jnp.arange(500) % 8, jnp.int32(0), 8, 13))
  assert drawn.min() == 0 and drawn.max() == 12


def test_glass_without_projection_scores_raw_features(data):
  _, test, _, _ = data
  method = get_method("glass", embed_dim=24, target_dim=24, hidden=16, projection=False,
                      noise_std=0.005)
  state = method.init(jax.random.key(0))
  assert set(state["params"]) == {"dsc"}
  scores, _ = method.score(state, test, IMAGE)
  x = np.asarray(method.embed(test))
  p, st = state["params"]["dsc"], state["stats"]
  h = x.reshape(-1, 24) @ np.asarray(p["fc"]["w"]) + np.asarray(p["fc"]["b"])
  h = (h - np.asarray(st["mean"])) / np.sqrt(np.asarray(st["var"]) + 1e-5)
  h = np.where(h > 0, h, 0.2 * h) @ np.asarray(p["out"]["w"])
  want = (1 / (1 + np.exp(-h))).reshape(len(x), -1).max(1)
  np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-5)
  # A training step's loss and gradients need no projection either.
  x = jnp.asarray(x[:2])
  centre = glass_lib._centre(method, state["params"], x)
  grads = jax.jit(jax.grad(lambda q: glass_lib._loss(method, q, state["stats"], x, x + 1.0,
                                                     jnp.ones(x.shape[:3]), centre,
                                                     jax.random.key(1))[0]))(state["params"])
  assert set(grads) == {"dsc"}
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_training_subset():
  normal, anomalous = common.training_subset(200, 50, noise_ratio=0.1, seed=3)
  assert len(normal) == 200 and len(anomalous) == round(0.1 * 200 / 0.9)
  assert len(set(anomalous)) == len(anomalous) and anomalous.max() < 50
  normal, anomalous = common.training_subset(200, shots=4, seed=3)
  assert len(normal) == 4 and len(set(normal)) == 4 and len(anomalous) == 0
  with pytest.raises(ValueError, match="shots"):
    common.training_subset(3, shots=8)
  with pytest.raises(ValueError, match="needs"):
    common.training_subset(100, 2, noise_ratio=0.5)
