"""Checkpoint selection during pretraining: the evaluator `adjax pretrain` is given, scoring
PatchCore ("angle") and FeatureNorm ("norm") on pretrained features of held-out classes."""

from __future__ import annotations

from typing import Any, Callable, Optional

import ml_collections
import numpy as np

from adjax.evaluate.features import FeatureMaker, reference_features
from adjax.evaluate.loop import score_method
from adjax.from_config import compute_dtype, split_classes


def selection_evaluator(config: ml_collections.ConfigDict, backbone, backbone_params
                        ) -> Optional[Callable[[Any, float], dict]]:
  """The validation evaluator of a pretraining run, or None when none is configured:
  config.data.val_* (or the test set, config.eval.*, with config.train.select_on == "test")
  every config.train.eval_every_epochs epochs."""
  use_test = config.train.select_on == "test"
  if config.train.select_on not in ("validation", "test"):
    raise ValueError(f"config.train.select_on must be 'validation' or 'test', got "
                     f"{config.train.select_on!r}")
  root = config.eval.root if use_test else config.data.val_root
  if not root or not config.train.eval_every_epochs:
    return None
  return make_selection_evaluator(config, backbone, backbone_params, use_test=use_test)


def make_selection_evaluator(config: ml_collections.ConfigDict, backbone, backbone_params, *,
                             use_test: bool = False) -> Callable[[Any, float], dict]:
  """Checkpoint selection during pretraining: mean image AUROC of PatchCore ("angle") and of
  FeatureNorm ("norm") on pretrained features of the validation classes (or, to reproduce the
  paper, of the test set)."""
  from data_pipelines.eval_pipeline import load_eval_class
  from data_pipelines.index import read_dataset
  fmt = config.eval.format if use_test else config.data.val_format
  root = config.eval.root if use_test else config.data.val_root
  classes = split_classes(config.eval.classes if use_test else config.data.val_classes)
  records = read_dataset(fmt, root, classes,
                         masks_optional=bool(config.eval.get("masks_optional", False)))
  maker = FeatureMaker(backbone, backbone_params, dtype=compute_dtype(config),
                       num_heads=config.projector.num_heads,
                       max_similarities=config.train.max_similarities)
  prepared = []
  for class_name in sorted({r.class_name for r in records}):
    data = load_eval_class(records, class_name, image_size=config.image_size, seed=config.seed)
    train_levels = maker.backbone_levels(data["train_images"])
    test_levels = maker.backbone_levels(data["test_images"])
    refs = reference_features(train_levels, int(config.eval.shots), ~data["train_noisy"],
                              class_name)
    prepared.append((maker.residual_levels(train_levels, refs),
                     maker.residual_levels(test_levels, refs), data))

  def evaluator(params: Any, epoch: float) -> dict[str, float]:
    del epoch
    scores = {"angle": [], "norm": []}
    for res_train, res_test, data in prepared:
      train_p = maker.projected_levels(params, res_train)
      test_p = maker.projected_levels(params, res_test)
      for kind, method in (("angle", "patchcore"), ("norm", "featurenorm")):
        metrics, *_ = score_method(method, {}, train_p, test_p, config.image_size, config.seed,
                                   data["test_labels"], data["test_masks"],
                                   has_mask=data["test_has_mask"])
        scores[kind].append(metrics["image_auroc"])
    return {k: float(np.mean(v)) for k, v in scores.items()}

  return evaluator
