"""Downstream anomaly detectors (SPEC section 6), by name.

Every method is a frozen dataclass of its settings with the same interface:

  method = get_method("patchcore", coreset_ratio=0.1)
  state = method.fit(train_levels, rng)          # list of (N, h_k, w_k, C_k) arrays
  image_scores, maps = method.score(state, test_levels, image_size)   # (M,), (M, H, W)

Methods are feature-agnostic: the caller passes the backbone's features ("original") or
projector(residual(features)) ("pretrained"), and each method picks its own levels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from adjax.methods.cflow import CFlow
from adjax.methods.featurenorm import FeatureNorm
from adjax.methods.glass import Glass
from adjax.methods.padim import PaDiM
from adjax.methods.patchcore import PatchCore
from adjax.methods.uniad import UniAD

METHODS: dict[str, type] = {
    "featurenorm": FeatureNorm,
    "patchcore": PatchCore,
    "padim": PaDiM,
    "cflow": CFlow,
    "uniad": UniAD,
    "glass": Glass,
}


def get_method(name: str, **overrides: Any):
  """The method `name` with its SPEC defaults, changed by `overrides`.

  Args:
    name: one of METHODS (case-insensitive).
    **overrides: settings of that method's dataclass (e.g. coreset_ratio=0.05).

  Returns:
    The method object (a frozen, hashable dataclass).

  Raises:
    ValueError: unknown name or unknown setting.
  """
  key = str(name).lower()
  if key not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
  cls = METHODS[key]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"method {key!r} has no setting(s) {unknown}; its settings are "
                     f"{sorted(fields)}")
  return cls(**overrides)


__all__ = ["METHODS", "get_method", "CFlow", "FeatureNorm", "Glass", "PaDiM", "PatchCore",
           "UniAD"]
