"""adjax: anomaly representation pretraining (ADPretrain) in JAX/Flax.

The public API (arrays are channels-last; converters take and give the reference's layouts):

  projector_from_torch(state_dict) -> params      projector_to_torch(params) -> state_dict
  init_projector(rng, level_dims) -> params       project(params, levels) -> levels
  angle_loss(e1, e2, labels, center=None, temperature=0.15)     norm_loss(features, labels)
  residual_features(features, refs) -> (residual, index)
  token_labels(masks, patch_size=14, threshold=32) -> (angle_labels, norm_labels)

Submodules (`adjax.metrics`, `adjax.methods`, `adjax.models.backbones`, ...) load on first use.
"""

from __future__ import annotations

import importlib

from adjax.convert.projector import projector_from_torch, projector_to_torch
from adjax.labels import token_labels
from adjax.losses.angle import angle_loss
from adjax.losses.norm import anomaly_score, norm_loss
from adjax.models.projector import init_projector, project
from adjax.residual import residual_features

__version__ = "0.1.0"

__all__ = [
    "angle_loss", "anomaly_score", "init_projector", "norm_loss", "project",
    "projector_from_torch", "projector_to_torch", "residual_features", "token_labels",
]


def __getattr__(name: str):
  # `adjax.metrics.aupro(...)` after a plain `import adjax`.
  try:
    return importlib.import_module(f"adjax.{name}")
  except ModuleNotFoundError as err:
    if err.name != f"adjax.{name}":
      raise  # the submodule exists but something it imports does not
    raise AttributeError(f"module 'adjax' has no attribute {name!r}") from err
