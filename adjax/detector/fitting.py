"""Fitting a Detector: the images, the features, the method and the thresholds (the work behind
`Detector.fit` and `adjax fit`)."""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adjax.configs.validation import validate_config
from adjax.detector import thresholds
from adjax.detector.format import FORMAT, FORMAT_VERSION, KINDS
from adjax.errors import UserError
from adjax.io import files

log = logging.getLogger("adjax.detector")


def weights_of(config: ml_collections.ConfigDict) -> Optional[dict]:
  """The backbone weights file a config reads ({"name", "path", "sha256"}), or None for the
  test backbone's random weights (made from config.seed)."""
  path = config.backbone.get("weights", "")
  if not path and config.backbone.name == "efficientnet-lite0":
    from adjax.models.backbones.efficientnet import default_weights_path
    path = default_weights_path()
  if not path:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  return {"name": os.path.basename(path), "path": path, "sha256": files.file_sha256(path)}


def _config_for(config: Optional[ml_collections.ConfigDict], workdir: Optional[str]):
  if config is not None:
    return config
  if workdir:
    from adjax import run_layout
    return run_layout.load_config(workdir)
  from adjax.configs import default_config
  return default_config()


def _split(paths: list[str], share: float, seed: int) -> tuple[list[str], list[str]]:
  """(fit, held out): `share` of the paths drawn with `seed`, the rest in their order."""
  if not 0.0 < share < 1.0:
    raise UserError(f"config.detect.holdout_share = {share}: without --val it must be in "
                    "(0, 1), the share of the training images that sets the thresholds")
  count = int(round(share * len(paths)))
  if count < 1 or count >= len(paths):
    raise UserError(f"--train has {len(paths)} images: too few to hold out "
                    f"config.detect.holdout_share = {share} of them for the thresholds; give "
                    "more images or --val DIR")
  held = set(np.random.default_rng(seed).permutation(len(paths))[:count].tolist())
  return ([p for i, p in enumerate(paths) if i not in held],
          [p for i, p in enumerate(paths) if i in held])


def _loaded(paths: Sequence[str], config, what: str):
  from data_pipelines.image_files import load_images
  loaded = load_images(paths, int(config.image_size), resize=int(config.eval.resize) or None)
  for path, reason in loaded.failed.items():
    log.warning("%s: skipped %s (%s)", what, path, reason)
  if not loaded.paths:
    raise UserError(f"{what}: none of the {len(paths)} images could be read")
  return loaded


def fit_detector(cls, train: Sequence[str], *, method: str, features: str,
                 workdir: Optional[str], val: Optional[str],
                 config: Optional[ml_collections.ConfigDict], progress: bool):
  """See Detector.fit."""
  from adjax.evaluate.features import (checkpoint_kind_for, load_projectors,
                                       method_settings_for, reference_features)
  from adjax.from_config import build_backbone, compute_dtype
  from adjax.methods import checked_settings, method_class
  from data_pipelines.image_files import labelled_images, list_images

  config = validate_config(_config_for(config, workdir), training=False)
  method = str(method).lower()
  try:
    method_class(method)
  except ValueError as err:
    raise UserError(f"--method: {err}") from err
  if features not in KINDS:
    raise UserError(f"--features must be one of {KINDS}, got {features!r}")
  if features == "pretrained" and not workdir:
    raise UserError("--features pretrained needs --workdir RUN (a pretraining run or an "
                    "imported projector)")
  det = config.detect
  if det.threshold not in thresholds.RULES:
    raise UserError(f"config.detect.threshold must be one of {thresholds.RULES}, got "
                    f"{det.threshold!r}")
  user_settings = {str(m).lower(): checked_settings(m, s, f"eval.method_settings.{m}")
                   for m, s in dict(config.eval.get("method_settings", {}) or {}).items()}
  settings = method_settings_for(method, features, user_settings)
  shots = int(config.eval.shots)

  train_paths = list_images(list(train), what="--train")
  val_labels = None
  if val:
    if os.path.isdir(os.path.join(val, "good")):
      val_paths, val_labels = labelled_images(val)
    else:
      val_paths = list_images([val], what="--val")
    fit_paths, validation = train_paths, {"source": os.path.abspath(val)}
  else:
    fit_paths, val_paths = _split(train_paths, float(det.holdout_share), int(config.seed))
    validation = {"source": f"held out: {len(val_paths)} of the {len(train_paths)} --train "
                            f"images (config.detect.holdout_share = {det.holdout_share})"}
  if det.threshold == "f1" and (val_labels is None or val_labels.min() == val_labels.max()):
    raise UserError("config.detect.threshold = 'f1' needs --val DIR in the labelled layout "
                    "(good/ beside defect folders) with both kinds of images")

  fit_images = _loaded(fit_paths, config, "--train")
  val_images = _loaded(val_paths, config, "--val" if val else "held-out --train images")
  if val_labels is not None:
    kept = set(val_images.paths)
    val_labels = np.asarray([y for p, y in zip(val_paths, val_labels) if p in kept])

  compute_dtype(config)   # a bad train.dtype is refused before any weights are read
  weights = weights_of(config)
  backbone, backbone_params = build_backbone(config, workdir)
  checkpoint = checkpoint_kind_for(method, config.eval.get("checkpoint", "auto"))
  manifest: dict[str, Any] = {
      "format": FORMAT, "format_version": FORMAT_VERSION, "adjax_version": _version(),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "method": method, "method_settings": settings, "features": features,
      "checkpoint": checkpoint if features == "pretrained" else None,
      "backbone": {"name": config.backbone.name,
                   "taps": ([int(t) for t in config.backbone.taps]
                            if config.backbone.get("taps") else None),
                   "weights": weights, "seed": int(config.seed)},
      "image_size": int(config.image_size), "resize": int(config.eval.resize) or None,
      "dtype": config.train.dtype, "batch_size": int(config.eval.batch_size),
      "num_heads": int(config.projector.num_heads),
      "max_similarities": int(config.train.max_similarities),
      "shots": shots, "seed": int(config.seed),
      "train": {"inputs": [os.path.abspath(t) for t in train], "fit_images": len(fit_images.paths),
                "skipped": fit_images.failed},
  }
  detector = cls(manifest=manifest, state=None, references=None, projector=None,
                 backbone=backbone, backbone_params=backbone_params)
  levels = detector.maker.backbone_levels(fit_images.images)
  if features != "original":
    if shots >= len(fit_images.paths):
      log.warning("eval.shots=%d >= the %d fitting images: every one is a reference, so every "
                  "training residual is zero", shots, len(fit_images.paths))
    detector.references = reference_features(levels, shots, None, "--train")
  if features == "pretrained":
    detector.projector = load_projectors(workdir, [checkpoint])[checkpoint]
  train_features = detector.from_backbone_levels(levels)
  del levels
  log.info("fitting %s on %s features of %d images", method, features, len(fit_images.paths))
  detector.state = fit_method(method, settings, train_features, int(config.seed),
                              int(config.image_size))
  del train_features

  scores, maps = detector.scores_in_batches(val_images.images)
  normal = scores if val_labels is None else scores[val_labels == 0]
  if normal.size == 0:
    raise UserError("--val has no normal (good/) image to set the thresholds on")
  normal_maps = maps if val_labels is None else maps[val_labels == 0]
  if det.threshold == "f1":
    image_t = thresholds.f1_threshold(scores, val_labels)
  else:
    image_t = thresholds.fpr_threshold(normal, float(det.target_fpr))
  pixel_t = thresholds.fpr_threshold(normal_maps, float(det.pixel_fpr))
  manifest["thresholds"] = {
      "image": image_t, "pixel": pixel_t, "rule": det.threshold,
      "target_fpr": float(det.target_fpr), "pixel_fpr": float(det.pixel_fpr),
      "validation_fpr": float(np.mean(normal > image_t))}
  validation.update({
      "images": len(val_images.paths), "normal_images": int(normal.size),
      "anomalous_images": int(0 if val_labels is None else (val_labels == 1).sum()),
      "skipped": val_images.failed,
      "image_scores": thresholds.score_statistics(normal),
      "pixel_scores": thresholds.score_statistics(normal_maps[:, ::4, ::4])})
  manifest["validation"] = validation
  return detector


def _version() -> str:
  try:
    from importlib.metadata import version
    return version("adjax")
  except Exception:  # running from a checkout
    return "0.1.0"


def fit_method(method_name: str, settings: dict, train_levels: Sequence[np.ndarray],
               seed: int, image_size: int) -> Any:
  """A method's state fitted on training features, as `adjax evaluate` fits it (same seed),
  made independent of the images scored with it where the method's scoring is not."""
  from adjax.methods import get_method, method_class
  method = get_method(method_name, **settings)
  levels = [jnp.asarray(x) for x in train_levels]
  if method_class(method_name).per_dataset:
    state = method.fit([levels], jax.random.PRNGKey(seed))   # one class: a dataset of one
  else:
    state = method.fit(levels, jax.random.PRNGKey(seed))
  if hasattr(method, "calibrated"):
    state = method.calibrated(state, levels, image_size)
  return state
