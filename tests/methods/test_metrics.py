"""Metrics against scikit-learn, brute force and the reference's own loop (docs/method.md
section 7)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import measure
from sklearn import metrics as skm

from adjax import metrics


def _sk_f1_max(y, s):
  p, r, _ = skm.precision_recall_curve(y, s)
  f1 = 2 * p * r / (p + r)
  return np.max(f1[np.isfinite(f1)])


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_image_metrics_match_sklearn(seed, ties):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, 300)
  s = rng.standard_normal(300) + 1.2 * y
  if ties:  # coarse scores: many tied groups mixing both labels
    s = np.round(s * 2) / 2
  got = metrics.image_metrics(y, s)
  np.testing.assert_allclose(got["auroc"], skm.roc_auc_score(y, s), rtol=1e-12)
  np.testing.assert_allclose(got["ap"], skm.average_precision_score(y, s), rtol=1e-12)
  np.testing.assert_allclose(got["f1_max"], _sk_f1_max(y, s), rtol=1e-12)
  assert metrics.auroc(y, s) == got["auroc"]
  assert metrics.average_precision(y, s) == got["ap"]
  assert metrics.f1_max(y, s) == got["f1_max"]


def test_known_answers():
  # Perfect separation, perfect inversion, and all tied.
  y = np.array([0, 0, 1, 1])
  assert metrics.image_metrics(y, np.array([0.1, 0.2, 0.8, 0.9])) == {
      "auroc": 1.0, "ap": 1.0, "f1_max": 1.0}
  assert metrics.auroc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
  assert metrics.auroc(y, np.zeros(4)) == 0.5
  assert metrics.average_precision(y, np.zeros(4)) == 0.5
  # One positive ranked second of four: AP = 1/2, F1-max = 2 * (1/2 * 1) / (3/2) = 2/3.
  y1 = np.array([0, 1, 0, 0])
  s1 = np.array([0.9, 0.8, 0.1, 0.0])
  np.testing.assert_allclose(metrics.average_precision(y1, s1), 0.5)
  np.testing.assert_allclose(metrics.f1_max(y1, s1), 2 / 3)


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match="0 and 1"):
    metrics.image_metrics(np.array([0, 2]), np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="both positive and negative"):
    metrics.image_metrics(np.array([1, 1]), np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="shape"):
    metrics.image_metrics(np.array([0, 1]), np.array([0.0, 1.0, 2.0]))
  with pytest.raises(ValueError, match="no anomalous pixel"):
    metrics.aupro(np.zeros((1, 4, 4)), np.ones((1, 4, 4)))
  with pytest.raises(ValueError, match="NaN"):
    metrics.aupro(np.ones((1, 2, 2)), np.full((1, 2, 2), np.nan))


def _brute_aupro(masks, maps, limit):
  """Per distinct threshold: regions by skimage (8-connectivity), then trapezoid + interp."""
  regions = []
  for i, m in enumerate(masks):
    lab = measure.label(m, connectivity=2)
    for r in range(1, lab.max() + 1):
      regions.append((i, lab == r))
  normal = masks == 0
  fprs, pros = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    pred = maps >= t
    fprs.append((pred & normal).sum() / normal.sum())
    pros.append(np.mean([pred[i][reg].mean() for i, reg in regions]))
  fprs, pros = np.array(fprs), np.array(pros)
  keep = fprs <= limit
  x, y = fprs[keep], pros[keep]
  if x[-1] < limit:
    x = np.r_[x, limit]
    j = np.flatnonzero(~keep)[0]
    y = np.r_[y, pros[j - 1] + (pros[j] - pros[j - 1]) * (limit - fprs[j - 1])
              / (fprs[j] - fprs[j - 1])]
  return np.trapezoid(y, x) / limit


@pytest.mark.parametrize("seed,levels", [(0, None), (1, 4), (2, 3)])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed, levels, limit):
  rng = np.random.default_rng(seed)
  masks = np.zeros((3, 12, 12), np.int32)
  masks[0, 2:5, 2:5] = 1
  masks[0, 5, 5] = 1            # touches the first region diagonally: same region (8-conn.)
  masks[0, 9:11, 1:3] = 1       # a second region
  masks[1, 6:11, 4:6] = 1
  maps = rng.random(masks.shape) + 0.6 * masks
  if levels is not None:        # heavy ties, across normal and anomalous pixels
    maps = np.floor(maps * levels) / levels
  got = metrics.aupro(masks, maps, fpr_limit=limit)
  np.testing.assert_allclose(got, _brute_aupro(masks, maps, limit), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(metrics.pixel_metrics(masks, maps, fpr_limit=limit)["aupro"],
                             got, rtol=1e-12)


def test_aupro_known_answers():
  masks = np.zeros((2, 8, 8))
  masks[0, 1:3, 1:3] = 1
  masks[1, 4:7, 4:7] = 1
  assert metrics.aupro(masks, masks.astype(float)) == pytest.approx(1.0)
  # Scores that ignore the mask, all tied: the curve is the diagonal pro = fpr, whose mean
  # height up to any limit is limit / 2.
  np.testing.assert_allclose(metrics.aupro(masks, np.ones_like(masks)), 0.15)
  # Regions weigh equally whatever their size: find only the small one perfectly, the large
  # one at the very end (score 0, below all normal pixels' 0.5): PRO = 1/2 up to FPR 1.
  maps = np.where(masks[..., :, :] > 0, 0.0, 0.5)
  maps[0][masks[0] > 0] = 1.0
  np.testing.assert_allclose(metrics.aupro(masks, maps, fpr_limit=0.3), 0.5)


def _reference_loop(masks, amaps, max_step=200, expect_fpr=0.3):
  """The reference's compute loop, as its metrics.py runs it (skimage regions)."""
  binary = np.zeros_like(amaps, dtype=bool)
  min_th, max_th = amaps.min(), amaps.max()
  delta = (max_th - min_th) / max_step
  pros, fprs = [], []
  for th in np.arange(min_th, max_th, delta):
    binary[amaps <= th], binary[amaps > th] = 0, 1
    pro = []
    for b, m in zip(binary, masks):
      for region in measure.regionprops(measure.label(m)):
        pro.append(b[region.coords[:, 0], region.coords[:, 1]].sum() / region.area)
    inv = 1 - masks
    fprs.append(np.logical_and(inv, binary).sum() / inv.sum())
    pros.append(np.mean(pro))
  pros, fprs = np.array(pros), np.array(fprs)
  keep = fprs < expect_fpr
  fprs = fprs[keep]
  if fprs.shape[0] <= 2:
    return 0.5
  fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
  return skm.auc(fprs, pros[keep])


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_reference_matches_its_loop(seed):
  rng = np.random.default_rng(seed)
  masks = np.zeros((3, 16, 16), np.int64)
  masks[0, 3:7, 3:9] = 1
  masks[1, 10:14, 2:4] = 1
  masks[1, 1:3, 12:15] = 1
  maps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float32)
  np.testing.assert_allclose(metrics.aupro_reference(masks, maps), _reference_loop(masks, maps),
                             rtol=1e-9)


def test_pixel_metrics_match_sklearn():
  rng = np.random.default_rng(3)
  masks = (rng.random((4, 10, 10)) < 0.1).astype(np.int32)
  maps = np.round(rng.random(masks.shape) + 0.5 * masks, 2)
  got = metrics.pixel_metrics(masks, maps)
  y, s = masks.ravel(), maps.ravel()
  np.testing.assert_allclose(got["auroc"], skm.roc_auc_score(y, s), rtol=1e-12)
  np.testing.assert_allclose(got["ap"], skm.average_precision_score(y, s), rtol=1e-12)
  np.testing.assert_allclose(got["f1_max"], _sk_f1_max(y, s), rtol=1e-12)
  np.testing.assert_allclose(got["aupro"], _brute_aupro(masks, maps, 0.3), rtol=1e-10)
