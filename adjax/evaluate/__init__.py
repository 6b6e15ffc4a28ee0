"""Evaluating downstream detectors on original, residual and pretrained features
(docs/method.md section 6; outputs and resume rules: docs/evaluation.md).

  features.py   feature kinds, references, which checkpoint and settings a method gets
  synthetic.py  GLASS's image-space texture anomalies
  loop.py       `evaluate`: every class, method and kind; results, tables, heat maps
  progress.py   resumable progress of an interrupted evaluation
  selection.py  the checkpoint-selection evaluator given to pretraining
  reporting.py  tables, overlays and t-SNE figures
"""

from adjax.evaluate.features import FEATURE_KINDS, FeatureMaker
from adjax.evaluate.loop import evaluate, mean_table, score_method

__all__ = ["FEATURE_KINDS", "FeatureMaker", "evaluate", "mean_table", "score_method"]
