"""Downstream anomaly detectors (docs/method.md section 6), by name.

Every method is a frozen dataclass of its settings with the same interface:

  method = get_method("patchcore", coreset_ratio=0.1)
  state = method.fit(train_levels, rng)          # list of (N, h_k, w_k, C_k) arrays
  image_scores, maps = method.score(state, test_levels, image_size)   # (M,), (M, H, W)

Methods are feature-agnostic: the caller passes the backbone's features ("original") or
projector(residual(features)) ("pretrained"), and each method picks its own levels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

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


def method_class(name: str) -> type:
  """The class of method `name` (case-insensitive), whose attributes declare its facts
  (adjax.methods.base.MethodFacts).

  Raises:
    ValueError: unknown name.
  """
  key = str(name).lower()
  if key not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
  return METHODS[key]


def get_method(name: str, **overrides: Any):
  """The method `name` with its defaults (docs/method.md section 6), changed by `overrides`.

  Args:
    name: one of METHODS (case-insensitive).
    **overrides: settings of that method's dataclass (e.g. coreset_ratio=0.05).

  Returns:
    The method object (a frozen, hashable dataclass).

  Raises:
    ValueError: unknown name or unknown setting.
  """
  cls = method_class(name)
  key = str(name).lower()
  fields = {f.name for f in dataclasses.fields(cls)}
  # The loop's input settings (cls.input_settings) are not the method's: see method_inputs.
  overrides = {k: v for k, v in overrides.items() if k not in cls.input_settings}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"method {key!r} has no setting(s) {unknown}; its settings are "
                     f"{sorted(fields)}")
  return cls(**overrides)


def method_inputs(name: str, settings: Mapping[str, Any] | None) -> dict[str, Any]:
  """The input settings of method `name` (its class's `input_settings`, e.g. GLASS's texture
  folder) from its checked eval.method_settings entry, defaults filled in."""
  cls = method_class(name)
  return {**cls.input_settings,
          **{k: v for k, v in dict(settings or {}).items() if k in cls.input_settings}}


def _did_you_mean(name: str, choices: Any) -> str:
  """"; did you mean 'x'?" for the nearest of `choices`, or ""."""
  import difflib
  close = difflib.get_close_matches(name, sorted(choices), n=1)
  return f"; did you mean {close[0]!r}?" if close else ""


def checked_settings(name: str, settings: Any, what: str) -> dict[str, Any]:
  """A method's user settings, checked and typed by its own fields.

  Settings typed on the command line arrive as their text's best guess (`--config.eval.
  method_settings.glass.projection=off` is the string "off"); each is converted to the type of
  the field's default (bool, int, float, tuple, str), as config overrides are.

  Args:
    name: the method (case-insensitive).
    settings: {setting: value}.
    what: how to name them in errors, e.g. "eval.method_settings.glass".

  Raises:
    ValueError: an unknown method or setting (with the nearest name), or a value that does not
      fit the setting's type.
  """
  from adjax.configs.loading import coerce
  key = str(name).lower()
  if key not in METHODS:
    raise ValueError(f"{what}: unknown method {name!r}{_did_you_mean(key, METHODS)} "
                     f"(methods: {sorted(METHODS)})")
  defaults = {**{f.name: f.default for f in dataclasses.fields(METHODS[key])},
              **METHODS[key].input_settings}
  checked = {}
  for setting, value in dict(settings or {}).items():
    if setting not in defaults:
      raise ValueError(f"{what}.{setting}: {key} has no such setting"
                       f"{_did_you_mean(setting, defaults)} (its settings: "
                       f"{', '.join(sorted(defaults))})")
    default = defaults[setting]
    if value is None or default is None or default is dataclasses.MISSING:
      checked[setting] = value   # nothing to type by
      continue
    if isinstance(value, list):
      value = tuple(value)
    text = value if isinstance(value, str) else repr(value)
    checked[setting] = coerce(text, default, f"{what}.{setting}")
  return checked


__all__ = ["METHODS", "checked_settings", "get_method", "method_inputs", "CFlow", "FeatureNorm",
           "Glass", "PaDiM", "PatchCore", "UniAD"]
