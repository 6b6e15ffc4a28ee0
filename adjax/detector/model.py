"""`Detector`: one downstream method fitted on a folder of normal images, with its thresholds,
that scores new images (the Python side of `adjax fit` / `adjax predict`).

    detector = Detector.fit(["line3/normal"], method="patchcore", features="original")
    detector.save("line3.detector")
    detector = Detector.load("line3.detector")
    scores, maps, flags = detector.predict(images)   # (N, S, S, 3) uint8, preprocessed

Features are made as `adjax evaluate` makes them (adjax/evaluate/features.py): the backbone's
("original"), minus the nearest of every token of the first `eval.shots` training images
("residual"), or a pretraining run's projector on the residuals ("pretrained", the checkpoint
the method uses). The same files, method, kind, shots and seed give evaluate's scores.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from adjax.detector import fitting, storage, thresholds
from adjax.errors import UserError

log = logging.getLogger("adjax.detector")



@dataclasses.dataclass
class Detector:
  """A fitted detector: what `save` writes and `load` reads back.

  Attributes:
    manifest: every setting and figure as JSON (see docs/detector.md).
    state: the method's fitted state (a pytree of arrays).
    references: per level (R_k, C_k) reference tokens, for the residual kinds; else None.
    projector: projector parameters for the pretrained kind; else None.
    backbone, backbone_params: the frozen backbone (built from the manifest on load).
  """
  manifest: dict
  state: Any
  references: Optional[list]
  projector: Any
  backbone: Any = None
  backbone_params: Any = None
  program: Optional[dict] = None   # {file name: bytes} of an exported scoring program
  _maker: Any = dataclasses.field(default=None, repr=False)

  # --------------------------------------------------------------------------- fitting
  @classmethod
  def fit(cls, train: Sequence[str], *, method: str = "patchcore", features: str = "original",
          workdir: Optional[str] = None, val: Optional[str] = None,
          config: Optional[ml_collections.ConfigDict] = None,
          progress: bool = False) -> "Detector":
    """Fits `method` on the normal images under `train` and sets its thresholds.

    Args:
      train: image files or folders (searched recursively) of normal images.
      method: featurenorm | patchcore | padim | cflow | uniad | glass.
      features: original | residual | pretrained (pretrained needs `workdir`).
      workdir: a pretraining run (its projector and config).
      val: a folder of normal validation images, or a labelled folder (`good/` beside defect
        folders); None: config.detect.holdout_share of `train`, not used for fitting.
      config: settings (backbone.*, image_size, eval.shots / resize / batch_size /
        method_settings, seed, detect.*); default: the run's config, else the default.
      progress: show progress bars.

    Raises:
      UserError: bad settings or inputs, named.
    """
    return fitting.fit_detector(cls, train, method=method, features=features, workdir=workdir,
                                val=val, config=config, progress=progress)

  # --------------------------------------------------------------------------- features
  @property
  def method(self):
    from adjax.methods import get_method
    return get_method(self.manifest["method"], **self.manifest["method_settings"])

  @property
  def image_size(self) -> int:
    return int(self.manifest["image_size"])

  @property
  def maker(self):
    if self._maker is None:
      from adjax.evaluate.features import FeatureMaker
      settings = self.manifest
      self._maker = FeatureMaker(self.backbone, self.backbone_params,
                                 dtype=jnp.dtype(settings["dtype"]),
                                 batch_size=int(settings["batch_size"]),
                                 num_heads=int(settings["num_heads"]),
                                 max_similarities=int(settings["max_similarities"]))
    return self._maker

  def features(self, images: np.ndarray) -> list[np.ndarray]:
    """The detector's feature kind of preprocessed images (N, S, S, 3) uint8."""
    return self.from_backbone_levels(self.maker.backbone_levels(images))

  def from_backbone_levels(self, levels: list[np.ndarray]) -> list[np.ndarray]:
    """The detector's feature kind from backbone levels."""
    kind = self.manifest["features"]
    if kind == "original":
      return levels
    residual = self.maker.residual_levels(levels, self.references)
    if kind == "residual":
      return residual
    return self.maker.projected_levels(self.projector, residual)

  def raw_scores(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image scores (N,) float64, maps (N, S, S) float32) of preprocessed images."""
    images = _checked_images(images, self.image_size)
    levels = [jnp.asarray(x) for x in self.features(images)]
    scores, maps = self.method.score(self.state, levels, self.image_size)
    return np.asarray(scores, np.float64), np.asarray(maps, np.float32)

  def predict(self, images: np.ndarray, *, batch: int = 32
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores preprocessed images (N, S, S, 3) uint8 (see data_pipelines.image_files).

    Returns:
      (scores (N,), maps (N, S, S), flags (N,) bool: score above the image threshold).
    """
    scores, maps = self.scores_in_batches(images, batch=batch)
    return scores, maps, scores > self.image_threshold

  def scores_in_batches(self, images: np.ndarray, *, batch: int = 32
                        ) -> tuple[np.ndarray, np.ndarray]:
    """raw_scores over `batch` images at a time (bounded memory; the scores do not depend on
    the batching)."""
    images = _checked_images(images, self.image_size)
    parts = [self.raw_scores(images[i:i + batch]) for i in range(0, len(images), batch)]
    if not parts:
      return np.zeros(0), np.zeros((0, self.image_size, self.image_size), np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

  @property
  def image_threshold(self) -> float:
    return float(self.manifest["thresholds"]["image"])

  @property
  def pixel_threshold(self) -> float:
    return float(self.manifest["thresholds"]["pixel"])

  def normalised(self, scores: np.ndarray) -> np.ndarray:
    """Scores in standard deviations above the normal validation images' mean score."""
    return thresholds.normalised(scores, self.manifest["validation"]["image_scores"])

  # --------------------------------------------------------------------------- files
  def save(self, path: str) -> str:
    """Writes the detector folder atomically (see adjax/detector/storage.py); returns it."""
    return storage.save_detector(self, path)

  @classmethod
  def load(cls, path: str, *, weights: Optional[str] = None) -> "Detector":
    """Reads a detector folder, checking every file's SHA-256 and the backbone weights'.

    weights: the backbone weights file under another path (its digest must still match).
    """
    return storage.load_detector(cls, path, weights=weights)


def _checked_images(images: Any, size: int) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
    raise UserError(f"images must be (N, {size}, {size}, 3) uint8 (preprocessed as "
                    f"data_pipelines.image_files.load_images makes them), got "
                    f"{images.shape} {images.dtype}")
  return images
