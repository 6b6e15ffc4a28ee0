"""Image and pixel metrics of anomaly detection (docs/method.md section 7).

All curves are built from one descending sort of the scores: cumulative sums of positives and
negatives, read at the end of every group of tied scores (one point per distinct threshold),
which is exactly what scikit-learn's `roc_curve` / `precision_recall_curve` do. The same sort
serves the exact AUPRO, where each anomalous pixel adds 1 / (area of its region x number of
regions) to the per-region overlap and each normal pixel adds to the false positive count.

Everything runs on the host in numpy: these metrics need every score at once (big_vision
gathers to the host for AUROC too). float64 accumulators keep thousands of full-size maps exact
enough.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

# 8-connectivity inside each (H, W) slice, nothing across the N axis: one `label` call labels
# every image's regions separately.
_STRUCTURE_8 = np.zeros((3, 3, 3), bool)
_STRUCTURE_8[1] = True


def _as_binary(labels: Any, what: str) -> np.ndarray:
  y = np.asarray(labels)
  if y.dtype != bool:
    uniq = np.unique(y)
    if not np.all(np.isin(uniq, (0, 1))):
      raise ValueError(f"{what} must hold only 0 and 1, found values {uniq[:5]}")
  return y.astype(bool)


def _check_pair(labels: Any, scores: Any, what: str, ndim: int | None = None):
  y = _as_binary(labels, f"{what} labels/masks")
  s = np.asarray(scores)
  if y.shape != s.shape:
    raise ValueError(f"{what}: labels/masks shape {y.shape} differs from scores/maps shape "
                     f"{s.shape}")
  if ndim is not None and y.ndim != ndim:
    raise ValueError(f"{what}: expected {ndim}-D arrays, got shape {y.shape}")
  if s.size == 0:
    raise ValueError(f"{what}: empty input")
  if not np.all(np.isfinite(s)):
    raise ValueError(f"{what}: scores/maps contain NaN or inf")
  return y, s


def _descending_order(scores: np.ndarray) -> np.ndarray:
  return np.argsort(-scores.ravel(), kind="stable")


def _tie_ends(sorted_scores: np.ndarray) -> np.ndarray:
  """Index of the last element of every run of equal values in a sorted array."""
  return np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]


def _counts(y: np.ndarray, s: np.ndarray, order: np.ndarray | None = None):
  """(fp, tp) counts at every distinct threshold, scores descending."""
  if order is None:
    order = _descending_order(s)
  ys = y.ravel()[order]
  ends = _tie_ends(s.ravel()[order])
  tp = np.cumsum(ys, dtype=np.int64)[ends]
  fp = ends + 1 - tp
  return fp, tp


# The keys of image_metrics (and, prefixed, of the per-class result tables).
IMAGE_METRICS = ("auroc", "ap", "f1_max")


def _curve_metrics(fp: np.ndarray, tp: np.ndarray, what: str) -> dict[str, float]:
  pos, neg = int(tp[-1]), int(fp[-1])
  if pos == 0 or neg == 0:
    raise ValueError(f"{what}: need both positive and negative samples, got {pos} positive "
                     f"and {neg} negative")
  tpr = np.r_[0.0, tp / pos]
  fpr = np.r_[0.0, fp / neg]
  auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
  precision = tp / (tp + fp)
  recall = tp / pos
  ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
  denom = precision + recall
  f1 = np.where(denom > 0, 2.0 * precision * recall / np.where(denom > 0, denom, 1.0), 0.0)
  return dict(zip(IMAGE_METRICS, (auroc, ap, float(f1.max()))))


def auroc(labels: Any, scores: Any) -> float:
  """Area under the ROC curve (ties handled as scikit-learn's `roc_auc_score`)."""
  y, s = _check_pair(labels, scores, "auroc")
  return _curve_metrics(*_counts(y, s), "auroc")["auroc"]


def average_precision(labels: Any, scores: Any) -> float:
  """Average precision, sum_n (R_n - R_{n-1}) P_n, as scikit-learn's step-wise AP."""
  y, s = _check_pair(labels, scores, "average_precision")
  return _curve_metrics(*_counts(y, s), "average_precision")["ap"]


def f1_max(labels: Any, scores: Any) -> float:
  """The best F1 over all thresholds of the precision-recall curve."""
  y, s = _check_pair(labels, scores, "f1_max")
  return _curve_metrics(*_counts(y, s), "f1_max")["f1_max"]


def image_metrics(labels: Any, scores: Any) -> dict[str, float]:
  """Image-level AUROC, AP and F1-max.

  Args:
    labels: (N,) in {0, 1} (1 = anomalous).
    scores: (N,) image anomaly scores.

  Returns:
    {"auroc", "ap", "f1_max"} as floats.
  """
  y, s = _check_pair(labels, scores, "image_metrics", ndim=1)
  return _curve_metrics(*_counts(y, s), "image_metrics")


def _check_maps(masks: Any, maps: Any, what: str):
  y, s = _check_pair(masks, maps, what)
  if y.ndim == 2:
    y, s = y[None], s[None]
  if y.ndim != 3:
    raise ValueError(f"{what}: masks and maps must be (N, H, W), got shape {y.shape}")
  return y, s


def _pro_curve(y: np.ndarray, s: np.ndarray, order: np.ndarray | None = None):
  """(fpr, pro) at every distinct threshold, starting at (0, 0), ending at (1, 1)."""
  regions, num_regions = ndimage.label(y, structure=_STRUCTURE_8)
  if num_regions == 0:
    raise ValueError("aupro: the masks hold no anomalous pixel")
  num_normal = int(y.size - np.count_nonzero(y))
  if num_normal == 0:
    raise ValueError("aupro: the masks hold no normal pixel")
  regions = regions.ravel()
  area = np.bincount(regions, minlength=num_regions + 1).astype(np.float64)
  # Per-pixel weight of the per-region-overlap average: 1 / (area * num_regions); 0 on normal.
  weight = np.where(regions > 0, 1.0 / (area[regions] * num_regions), 0.0)
  if order is None:
    order = _descending_order(s)
  ends = _tie_ends(s.ravel()[order])
  pro = np.cumsum(weight[order])[ends]
  fp = np.cumsum(regions[order] == 0, dtype=np.int64)[ends]
  fpr = np.r_[0.0, fp / num_normal]
  pro = np.r_[0.0, np.minimum(pro, 1.0)]
  return fpr, pro


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
  """Trapezoid area under the polyline (x, y) (x nondecreasing) from x[0] to `limit`."""
  i = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
  xs, ys = x[:i], y[:i]
  area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))
  if i < x.size and xs[-1] < limit:
    # Interpolate the curve at the limit along the segment that crosses it.
    t = (limit - xs[-1]) / (x[i] - xs[-1])
    y_lim = ys[-1] + t * (y[i] - ys[-1])
    area += (limit - xs[-1]) * (ys[-1] + y_lim) / 2.0
  return area


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
  """Exact area under the per-region-overlap curve up to `fpr_limit`, normalised (MVTec AD).

  Regions are the 8-connected components of each ground-truth mask. At every distinct
  threshold t (a pixel is predicted anomalous when its score >= t) the per-region overlap is
  the mean over all regions of all images of the share of the region's pixels predicted
  anomalous, and the false positive rate is the share of all normal pixels predicted anomalous.
  The area under that curve from FPR 0 to `fpr_limit` (the curve interpolated linearly at the
  limit) is divided by `fpr_limit`, so a perfect detector scores 1.

  Args:
    masks: (N, H, W) in {0, 1}, with at least one anomalous and one normal pixel.
    maps: (N, H, W) anomaly scores.
    fpr_limit: integration limit in (0, 1].

  Returns:
    The normalised AUPRO as a float.
  """
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}")
  y, s = _check_maps(masks, maps, "aupro")
  fpr, pro = _pro_curve(y, s)
  return float(_area_to_limit(fpr, pro, fpr_limit) / fpr_limit)


def aupro_reference(masks: Any, maps: Any, max_step: int = 200,
                    expect_fpr: float = 0.3) -> float:
  """The approximate AUPRO of the ADPretrain/CFLOW reference code, vectorised.

  Thresholds are `np.arange(min, max, (max - min) / max_step)` of the maps (a pixel counts as
  anomalous when its score > threshold); the points with FPR < expect_fpr are kept, their FPR
  min-max rescaled to [0, 1], and the trapezoid area taken with no interpolation at the limit.
  With two or fewer points kept the reference returns 0.5, and so does this.

  Args:
    masks: (N, H, W) in {0, 1}.
    maps: (N, H, W) anomaly scores.
    max_step: number of thresholds.
    expect_fpr: FPR limit.

  Returns:
    The reference's AUPRO as a float.
  """
  y, s = _check_maps(masks, maps, "aupro_reference")
  regions, num_regions = ndimage.label(y, structure=_STRUCTURE_8)
  if num_regions == 0:
    raise ValueError("aupro_reference: the masks hold no anomalous pixel")
  min_th, max_th = s.min(), s.max()
  delta = (max_th - min_th) / max_step
  if delta == 0:
    return 0.5
  ths = np.arange(min_th, max_th, delta)
  t = ths.size
  flat = s.ravel()
  # bin b of a pixel = number of thresholds strictly below its score, so the pixel is above
  # threshold j exactly when j < b.
  bins = np.searchsorted(ths, flat, side="left")
  reg = regions.ravel()
  counts = np.zeros((num_regions + 1, t + 1), np.int64)
  np.add.at(counts, (reg, bins), 1)
  above = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (R + 1, T): # > threshold j
  area = np.bincount(reg, minlength=num_regions + 1)
  pros = (above[1:] / area[1:, None]).mean(axis=0)
  fprs = above[0] / area[0]
  keep = fprs < expect_fpr
  fprs, pros = fprs[keep], pros[keep]
  if fprs.size <= 2:
    return 0.5
  fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
  # sklearn's `auc` accepts a monotonically decreasing x (FPR falls as the threshold rises).
  return float(abs(np.sum(np.diff(fprs) * (pros[1:] + pros[:-1]) / 2.0)))


def pixel_metrics(masks: Any, maps: Any, *, fpr_limit: float = 0.3,
                  with_aupro: bool = True) -> dict[str, float]:
  """Pixel-level AUROC, AP, F1-max and exact AUPRO, from one sort of all pixels.

  Args:
    masks: (N, H, W) in {0, 1}.
    maps: (N, H, W) anomaly scores.
    fpr_limit: AUPRO integration limit.
    with_aupro: skip AUPRO (for example when no test image is anomalous).

  Returns:
    {"auroc", "ap", "f1_max", "aupro"} as floats ("aupro" only when with_aupro).
  """
  y, s = _check_maps(masks, maps, "pixel_metrics")
  order = _descending_order(s)
  out = _curve_metrics(*_counts(y, s, order), "pixel_metrics")
  if with_aupro:
    fpr, pro = _pro_curve(y, s, order)
    out["aupro"] = float(_area_to_limit(fpr, pro, fpr_limit) / fpr_limit)
  return out
