"""What an interrupted `adjax evaluate` keeps, and how a rerun continues it.

After every method of every class the results so far go to `<out>/results.partial.json`, with
the settings that made them. A rerun into the same folder reads them back and skips every
(method, class, kind) already scored, if its settings would give the same numbers; otherwise
it stops with an error rather than mix results of two evaluations into one table.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from adjax import run_layout

PARTIAL_NAME = "results.partial.json"

# The config settings an evaluation's numbers depend on: whole sections and single keys ...
_SECTIONS = ("eval.", "backbone.")
_KEYS = ("seed", "image_size", "projector.num_heads", "train.dtype")
# ... less those that may change between the runs: where things are, batching (float rounding
# only) and plots, and which classes, methods and kinds are run (each method, class and kind is
# resumed on its own).
_FREE = ("eval.root", "eval.classes", "eval.methods", "eval.features", "eval.batch_size",
         "eval.tsne", "backbone.weights", "backbone.cache_dir")


def params_digest(params: Any) -> str:
  """sha256 of a parameter tree's names, shapes, dtypes and values."""
  digest = hashlib.sha256()
  for name, value in sorted(run_layout.flatten_params(params).items()):
    value = np.ascontiguousarray(np.asarray(value))
    digest.update(f"{name}:{value.dtype}:{value.shape};".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def evaluation_settings(config: Any, projectors: Mapping[str, Any]) -> dict[str, Any]:
  """{"config": the settings the numbers depend on, "projectors": {kind: params digest}}, as
  JSON gives them back (tuples as lists)."""
  kept = {key: value for key, value in sorted(run_layout.flat_config(config).items())
          if (key.startswith(_SECTIONS) or key in _KEYS) and key not in _FREE}
  return {"config": kept,
          "projectors": {kind: params_digest(params) for kind, params in projectors.items()}}


def _shown(settings: Mapping[str, Any], key: str) -> str:
  return repr(settings[key]) if key in settings else "unset"


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  was, now = old["config"], new["config"]
  changes = [f"{key} ({_shown(was, key)} there, {_shown(now, key)} here)"
             for key in sorted(set(was) | set(now))
             if key not in was or key not in now or was[key] != now[key]]
  # Only the projectors both evaluations loaded (a method added here may load another).
  changes += [f"the {kind}-selected projector (other parameters)"
              for kind in sorted(set(old["projectors"]) & set(new["projectors"]))
              if old["projectors"][kind] != new["projectors"][kind]]
  return changes


def _nan_for_none(results: Any) -> Any:
  # write_json stores NaN (a metric undefined for a one-label test set) as null.
  if isinstance(results, Mapping):
    return {key: _nan_for_none(value) for key, value in results.items()}
  return math.nan if results is None else results


def read_partial(out_dir: str, settings: Mapping[str, Any]) -> dict[str, Any]:
  """The results {method: {class: {kind: metrics}}} an interrupted evaluation left in
  `out_dir` ({} if none).

  Raises:
    ValueError: they were made with other settings (each difference named).
  """
  path = os.path.join(out_dir, PARTIAL_NAME)
  if not os.path.isfile(path):
    return {}
  partial = run_layout.read_json(path)
  old = partial.get("settings") if isinstance(partial, dict) else None
  if not isinstance(old, dict) or "config" not in old or "projectors" not in old:
    raise ValueError(f"{path} holds results of an interrupted evaluation without the settings "
                     "that made them (an older adjax): remove it to start afresh, or pass "
                     "another --out")
  changes = _differences(old, settings)
  if changes:
    raise ValueError(f"{path} holds results of an interrupted evaluation with other settings: "
                     f"{'; '.join(changes)}. Rerun with its settings to continue it, remove "
                     "the file to start afresh, or pass another --out")
  return _nan_for_none(partial.get("results", {}))


def kept_results(earlier: Mapping[str, Any], methods: Sequence[str], classes: Sequence[str],
                 kinds: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
  """Of `read_partial`'s results, those of this run's methods, classes and kinds."""
  kept: dict[str, dict[str, dict[str, Any]]] = {}
  for method in methods:
    kept[method] = {}
    for class_name in classes:
      scored = earlier.get(method, {}).get(class_name, {})
      per_kind = {kind: scored[kind] for kind in kinds if kind in scored}
      if per_kind:
        kept[method][class_name] = per_kind
  return kept


def write_partial(out_dir: str, results: Mapping[str, Any], classes_done: list[str],
                  settings: Mapping[str, Any]) -> None:
  """Writes the results so far (atomically) with the settings that made them."""
  run_layout.write_json(os.path.join(out_dir, PARTIAL_NAME),
                        {"results": results, "classes_done": classes_done,
                         "settings": settings})
