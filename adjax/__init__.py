"""adjax: anomaly representation pretraining (ADPretrain) in JAX/Flax.

The public API (arrays are channels-last; converters take and give the reference's layouts):

  projector_from_torch(state_dict) -> params      projector_to_torch(params) -> state_dict
  init_projector(rng, level_dims) -> params       project(params, levels) -> levels
  angle_loss(e1, e2, labels, center=None, temperature=0.15)     norm_loss(features, labels)
  residual_features(features, refs) -> (residual, index)
  token_labels(masks, patch_size=14, threshold=32) -> (angle_labels, norm_labels)
  Detector.fit(train_dirs, method=..., features=...) -> detector; detector.save(path);
  Detector.load(path); detector.predict(images) -> (scores, maps, flags)

Names and submodules (`adjax.metrics`, `adjax.methods`, `adjax.models.backbones`, ...) load on
first use, so that a data-loading worker that only needs `adjax.labels` does not import flax.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_API = {
    "Detector": "adjax.detector.model",
    "angle_loss": "adjax.losses.angle",
    "anomaly_score": "adjax.losses.norm",
    "init_projector": "adjax.models.projector",
    "norm_loss": "adjax.losses.norm",
    "project": "adjax.models.projector",
    "projector_from_torch": "adjax.models.projector_torch",
    "projector_to_torch": "adjax.models.projector_torch",
    "residual_features": "adjax.residual",
    "token_labels": "adjax.labels",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
  if name in _API:
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
  # `adjax.metrics.aupro(...)` after a plain `import adjax`.
  try:
    return importlib.import_module(f"adjax.{name}")
  except ModuleNotFoundError as err:
    if err.name != f"adjax.{name}":
      raise  # the submodule exists but something it imports does not
    raise AttributeError(f"module 'adjax' has no attribute {name!r}") from err


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_API))
