"""Decision thresholds of a fitted detector, from scores of validation images (pure numpy).

A detector flags an image whose score is above its image threshold, and a pixel whose map value
is above its pixel threshold. Both are set on validation images the method was not fitted on:
by default normal images only, at a target false-positive rate; with labelled anomalies the
F1-optimal image threshold may be asked for instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RULES = ("fpr", "f1")


def fpr_threshold(normal_scores: Any, fpr: float) -> float:
  """The smallest threshold t among the scores with share(normal_scores > t) <= fpr.

  With n scores at most floor(fpr * n) of them lie above t; with fpr * n < 1 that is the
  largest normal score (no validation image flagged).
  """
  scores = np.sort(np.asarray(normal_scores, np.float64).ravel())
  if scores.size == 0:
    raise ValueError("no validation scores to set a threshold on")
  if not 0.0 <= fpr < 1.0:
    raise ValueError(f"the target false-positive rate must be in [0, 1), got {fpr}")
  allowed = int(np.floor(fpr * scores.size + 1e-9))
  return float(scores[scores.size - 1 - allowed])


def f1_threshold(scores: Any, labels: Any) -> float:
  """The threshold t (flag = score > t) with the highest F1 on labelled scores; ties go to the
  highest t (fewest flags)."""
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels).ravel().astype(bool)
  if labels.all() or not labels.any():
    raise ValueError("the F1-optimal threshold needs both normal and anomalous validation images")
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order]
  # Flagging the first i+1 (highest) scores: t just below s[i]; only where the next differs.
  tp = np.cumsum(y)
  fp = np.cumsum(~y)
  f1 = 2 * tp / (tp + fp + y.sum())
  distinct = np.append(s[1:] < s[:-1], True)
  best = int(np.flatnonzero(distinct)[np.argmax(f1[distinct])])
  below = s[best + 1] if best + 1 < s.size else s[best] - 1.0
  return float((s[best] + below) / 2.0) if below < s[best] else float(below)


def score_statistics(scores: Any) -> dict[str, float]:
  """Summary of validation scores, stored with a detector (the normalised score uses mean and
  std)."""
  x = np.asarray(scores, np.float64).ravel()
  return {"count": int(x.size), "mean": float(x.mean()), "std": float(x.std()),
          "min": float(x.min()), "max": float(x.max()),
          "p50": float(np.quantile(x, 0.5)), "p95": float(np.quantile(x, 0.95)),
          "p99": float(np.quantile(x, 0.99))}


def normalised(scores: Any, stats: dict[str, float]) -> np.ndarray:
  """Scores in standard deviations of the normal validation scores above their mean."""
  return (np.asarray(scores, np.float64) - stats["mean"]) / max(stats["std"], 1e-12)
