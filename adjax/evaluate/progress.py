"""What an interrupted `adjax evaluate` keeps, and how a rerun continues it.

After every method of every class the results so far go to `<out>/results.partial.json`, with
the settings that made them, each (method, class, kind)'s per-image scores and each class's test
images (paths, labels, how many have masks), which the scores CSVs and mask counts are made of.
A rerun into the same folder reads them back and skips every (method, class, kind) already
scored, if its settings would give the same numbers; otherwise it
stops with an error rather than mix results of two evaluations into one table (a setting of one
method only counts if the file holds results of that method). Results outside a rerun's classes,
methods or kinds stay in the file (which is then kept after the rerun finishes) for a later run
that covers them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from adjax.io import files
from adjax import run_layout

log = logging.getLogger("adjax.evaluate")

PARTIAL_NAME = "results.partial.json"

# The config settings an evaluation's numbers depend on: whole sections and single keys ...
_SECTIONS = ("eval.", "backbone.")
_KEYS = ("seed", "image_size", "projector.num_heads", "train.dtype")
# ... less those that may change between the runs: where the dataset and the weights are (the
# backbone's parameters themselves are compared), batching (float rounding only) and plots,
# and which classes, methods and kinds are run (each method, class and kind is resumed on its
# own). Other folders (textures, foreground masks, aligned references) are compared as given.
_FREE = ("eval.root", "eval.classes", "eval.methods", "eval.features", "eval.batch_size",
         "eval.tsne", "backbone.weights", "backbone.cache_dir")

Results = dict[str, dict[str, dict[str, Any]]]   # {method: {class: {kind: metrics}}}


def params_digest(params: Any) -> str:
  """sha256 of a parameter tree's names, shapes, dtypes and values."""
  digest = hashlib.sha256()
  for name, value in sorted(run_layout.flatten_params(params).items()):
    value = np.ascontiguousarray(np.asarray(value))
    digest.update(f"{name}:{value.dtype}:{value.shape};".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def evaluation_settings(config: Any, backbone_params: Any,
                        projectors: Mapping[str, Any]) -> dict[str, Any]:
  """{"config": the settings the numbers depend on, "backbone": its parameters' digest,
  "projectors": {kind: params digest}}, as JSON gives them back (tuples as lists)."""
  kept = {key: value for key, value in sorted(run_layout.flat_config(config).items())
          if (key.startswith(_SECTIONS) or key in _KEYS) and key not in _FREE}
  return {"config": kept, "backbone": params_digest(backbone_params),
          "projectors": {kind: params_digest(params) for kind, params in projectors.items()}}


def _shown(settings: Mapping[str, Any], key: str) -> str:
  return repr(settings[key]) if key in settings else "unset"


# Settings that change one method's numbers only: a difference counts only when the file holds
# results of that method (so another GLASS setting does not hold up PatchCore's resume).
_METHOD_KEYS = {"eval.best_over_test": ("cflow", "glass"),
                "eval.aligned_references": ("featurenorm",)}


def _methods_of(key: str) -> Optional[tuple[str, ...]]:
  """The methods whose numbers `key` alone changes; None: every method's."""
  if key.startswith("eval.method_settings."):
    return (key.split(".")[2].lower(),)
  return _METHOD_KEYS.get(key)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any],
                 methods_with_results: set[str]) -> list[str]:
  was, now = old["config"], new["config"]
  changes = [f"{key} ({_shown(was, key)} there, {_shown(now, key)} here)"
             for key in sorted(set(was) | set(now))
             if (key not in was or key not in now or was[key] != now[key])
             and (_methods_of(key) is None or methods_with_results & set(_methods_of(key)))]
  if old["backbone"] != new["backbone"]:
    changes.append("the backbone's parameters (another weights file)")
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
  """What an interrupted evaluation left in `out_dir` ({} if nothing): {"results", "settings",
  "fitted_on", "tsne"}.

  Raises:
    ValueError: it was made with other settings (each difference named).
  """
  path = os.path.join(out_dir, PARTIAL_NAME)
  if not os.path.isfile(path):
    return {}
  partial = files.read_json(path)
  old = partial.get("settings") if isinstance(partial, dict) else None
  if not isinstance(old, dict) or not {"config", "backbone", "projectors"} <= set(old):
    raise ValueError(f"{path} holds results of an interrupted evaluation without the settings "
                     "that made them (an older adjax): remove it to start afresh, or pass "
                     "another --out")
  results = partial.get("results", {})
  changes = _differences(old, settings, {m for m, per_class in results.items() if per_class})
  if changes:
    raise ValueError(f"{path} holds results of an interrupted evaluation with other settings: "
                     f"{'; '.join(changes)}. Rerun with its settings to continue it, remove "
                     "the file to start afresh, or pass another --out")
  return {**partial, "results": _nan_for_none(partial.get("results", {})),
          "scores": _nan_for_none(partial.get("scores", {}))}


class EvaluationProgress:
  """The results of one `adjax evaluate` run so far, with what the partial file carries for
  other runs.

  Args:
    out_dir: the evaluation's folder.
    settings: `evaluation_settings` of this run.
    methods, classes, kinds: what this run evaluates.
    per_dataset: methods fitted on every class together (UniAD): their results are kept only
      if they were fitted on this run's classes.
  """

  def __init__(self, out_dir: str, settings: Mapping[str, Any], methods: Sequence[str],
               classes: Sequence[str], kinds: Sequence[str], per_dataset: Sequence[str]):
    earlier = read_partial(out_dir, settings)
    self.out_dir, self._classes, self._kinds = out_dir, list(classes), tuple(kinds)
    self._methods = tuple(methods)
    # Projector digests of both runs (those they share are equal): a later run may load either.
    self._settings = {**settings, "projectors": {**earlier.get("settings", {}).get(
        "projectors", {}), **settings["projectors"]}}
    old_fitted: dict[str, list[str]] = earlier.get("fitted_on", {})
    self.results: Results = {m: {} for m in methods}
    # Per (method, class, kind): the test images' scores, in the order of `images[class]`.
    self.scores: Results = {m: {} for m in methods}
    self._carried: Results = {}   # results outside this run, kept in the file
    self._carried_scores: Results = {}
    # Per class: {"paths", "labels", "test_images", "anomalous_images", "anomalous_with_masks",
    # "images_with_masks"} (see `class_images`); a class loaded again is replaced.
    self.images: dict[str, dict[str, Any]] = dict(earlier.get("images", {}))
    self._fitted_on = {m: c for m, c in old_fitted.items() if m not in methods}
    for method in earlier.get("results", {}):
      if method in per_dataset and method in methods:
        # One model for the dataset: its numbers hold for the classes it was fitted on only.
        if old_fitted.get(method) != self._classes:
          continue
        self._fitted_on[method] = self._classes
      for key, inside_tree, carried_tree in (("results", self.results, self._carried),
                                             ("scores", self.scores, self._carried_scores)):
        for class_name, per_kind in earlier[key].get(method, {}).items():
          for kind, value in per_kind.items():
            inside = method in methods and class_name in self._classes and kind in kinds
            target = inside_tree if inside else carried_tree
            target.setdefault(method, {}).setdefault(class_name, {})[kind] = value
    self.tsne: Optional[str] = earlier.get("tsne")
    self.resumed = sum(self.done(m, c, k) for m in methods for c in classes for k in kinds)
    if self.resumed:
      log.info("continuing the evaluation in %s: %d of %d (method, class, kind) results kept",
               out_dir, self.resumed, len(methods) * len(self._classes) * len(kinds))

  def done(self, method: str, class_name: str, kind: Optional[str] = None) -> bool:
    """Whether `method` has scored `class_name` in `kind` (default: in every kind)."""
    # Without its scores (a file of an older adjax) a result is made again, for the CSVs.
    scored = self.results[method].get(class_name, {})
    with_scores = self.scores[method].get(class_name, {})
    return all(k in scored and k in with_scores for k in ([kind] if kind else self._kinds))

  def fitted(self, method: str) -> None:
    """Marks a per-dataset method as fitted on this run's classes (before `save`)."""
    self._fitted_on[method] = self._classes

  def scored(self, method: str, class_name: str, kind: str, metrics: Mapping[str, float],
             scores: np.ndarray) -> None:
    """Records one (method, class, kind)'s metrics and per-image scores."""
    self.results[method].setdefault(class_name, {})[kind] = dict(metrics)
    self.scores[method].setdefault(class_name, {})[kind] = \
        np.asarray(scores, np.float64).tolist()

  @staticmethod
  def _merged_tree(carried: Results, current: Results) -> Results:
    merged: Results = {m: {c: dict(k) for c, k in per_class.items()}
                       for m, per_class in carried.items()}
    for method, per_class in current.items():
      for class_name, per_kind in per_class.items():
        merged.setdefault(method, {}).setdefault(class_name, {}).update(per_kind)
    return merged

  def _merged(self) -> Results:
    return self._merged_tree(self._carried, self.results)

  def save(self) -> None:
    """Writes the partial file (atomically): this run's results and those carried."""
    classes_done = [c for c in self._classes if all(self.done(m, c) for m in self._methods)]
    files.write_json(os.path.join(self.out_dir, PARTIAL_NAME),
                          {"results": self._merged(),
                           "scores": self._merged_tree(self._carried_scores, self.scores),
                           "images": self.images, "classes_done": classes_done,
                           "fitted_on": self._fitted_on, "tsne": self.tsne,
                           "settings": self._settings})

  def finish(self) -> None:
    """After results.json: the partial file goes, unless it carries results of other runs."""
    path = os.path.join(self.out_dir, PARTIAL_NAME)
    if self._carried:
      self.save()
      log.info("%s kept: it also holds results of classes, methods or kinds this run did not "
               "evaluate", path)
    elif os.path.exists(path):
      os.remove(path)


def class_images(data: Mapping[str, Any]) -> dict[str, Any]:
  """A loaded class's test images (`load_eval_class`'s dict) as the progress keeps them: paths,
  labels, and how many have masks. `images_with_masks` counts the images the pixel metrics are
  computed over: the normal ones (an all-zero mask) and the anomalous ones with a mask."""
  labels = np.asarray(data["test_labels"])
  has_mask = np.asarray(data["test_has_mask"], bool)
  return {"paths": list(data["test_paths"]), "labels": labels.astype(int).tolist(),
          "test_images": int(labels.size), "anomalous_images": int((labels == 1).sum()),
          "anomalous_with_masks": int(((labels == 1) & has_mask).sum()),
          "images_with_masks": int(has_mask.sum())}
