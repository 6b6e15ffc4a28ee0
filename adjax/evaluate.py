"""`adjax evaluate`: downstream detectors on original and pretrained features (SPEC section 6).

For every evaluation class: backbone features of its normal training images and of its test
images are computed once; from them the feature kinds are derived:

  original    the backbone's features;
  residual    features minus their nearest reference feature (references: every token of
              `eval.shots` normal training images of the class), no projector;
  pretrained  projector(residual), the paper's pretrained features.

Every method then fits on the training features and scores the test images of the same class,
with the same seed, for each kind. The reference uses its PatchCore-selected ("angle")
checkpoint for PatchCore and PaDiM and the FeatureNorm-selected ("norm") one for the rest;
`eval.checkpoint = "auto"` does the same.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adjax import eval_progress, run_layout
from adjax.models.projector import project
from adjax.residual import residual_features

log = logging.getLogger("adjax.evaluate")

FEATURE_KINDS = ("original", "residual", "pretrained")
_ANGLE_METHODS = ("patchcore", "padim")   # use the PatchCore-selected checkpoint
PER_DATASET_METHODS = ("uniad",)           # one model for all classes of a dataset


def checkpoint_kind_for(method: str, choice: str = "auto") -> str:
  """Which selected checkpoint a method uses: the reference's rule, unless forced."""
  if choice == "auto":
    return "angle" if method in _ANGLE_METHODS else "norm"
  if choice not in run_layout.KINDS:
    raise ValueError(f"config.eval.checkpoint must be 'auto', 'angle' or 'norm', got {choice!r}")
  return choice


def _in_batches(fn: Callable, arrays: Sequence[np.ndarray], batch: int) -> list[np.ndarray]:
  """fn over aligned batches of `arrays` (rows), its outputs concatenated; the last batch is
  padded by repeating its last row so that every call has one shape (one compile)."""
  outs: list[list[np.ndarray]] = []
  for start in range(0, len(arrays[0]), batch):
    chunks = [a[start:start + batch] for a in arrays]
    pad = batch - len(chunks[0])
    if pad:
      chunks = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunks]
    outs.append([np.asarray(out, np.float32)[:batch - pad] for out in fn(chunks)])
  return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


class FeatureMaker:
  """Computes original / residual / pretrained features of a class's images."""

  def __init__(self, backbone, backbone_params, *, dtype=jnp.float32, batch_size: int = 16,
               num_heads: int = 16, max_similarities: int = 1 << 25):
    self.backbone = backbone
    self.backbone_params = backbone_params
    self.dtype = dtype
    self.batch_size = batch_size
    self.num_heads = num_heads
    self.max_similarities = max_similarities
    self._project = jax.jit(lambda p, levels: project(p, levels, num_heads=num_heads,
                                                      dtype=dtype))

  def backbone_levels(self, images: np.ndarray) -> list[np.ndarray]:
    """images (N, S, S, 3) uint8 -> levels (N, h, w, C) float32."""
    return _in_batches(lambda chunks: self.backbone.extract(
        self.backbone_params, jnp.asarray(chunks[0], jnp.float32) / 255.0, self.dtype),
        [images], self.batch_size)

  def aligned_residual_levels(self, levels: Sequence[np.ndarray],
                              train_levels: Sequence[np.ndarray],
                              references: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Residuals of image i against every token of its own reference images references[i]
    (indices into train_levels), one image at a time."""
    out = []
    for level, train in zip(levels, train_levels):
      rows = [np.asarray(residual_features(
          jnp.asarray(level[i:i + 1]), jnp.asarray(train[list(refs)].reshape(-1, train.shape[-1])),
          max_similarities=self.max_similarities)[0]) for i, refs in enumerate(references)]
      out.append(np.concatenate(rows))
    return out

  def residual_levels(self, levels: Sequence[np.ndarray],
                      refs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Residuals against shared references refs[k] (N_k, C_k)."""
    out = []
    for level, ref in zip(levels, refs):
      chunks = [np.asarray(residual_features(jnp.asarray(level[i:i + self.batch_size]),
                                             jnp.asarray(ref),
                                             max_similarities=self.max_similarities)[0])
                for i in range(0, len(level), self.batch_size)]
      out.append(np.concatenate(chunks))
    return out

  def projected_levels(self, params: Any, levels: Sequence[np.ndarray]) -> list[np.ndarray]:
    return _in_batches(lambda chunks: self._project(params, [jnp.asarray(c) for c in chunks]),
                       list(levels), self.batch_size)

  def features_of(self, kinds: Sequence[str], levels, refs,
                  projector: dict[str, Any]) -> dict[str, list]:
    """{kind: levels} of one image set; pretrained kinds as "pretrained:<checkpoint kind>"."""
    out: dict[str, list] = {}
    if "original" in kinds:
      out["original"] = levels
    if any(k in ("residual", "pretrained") for k in kinds):
      residual = self.residual_levels(levels, refs)
      if "residual" in kinds:
        out["residual"] = residual
      if "pretrained" in kinds:
        for ckpt, params in projector.items():
          out[f"pretrained:{ckpt}"] = self.projected_levels(params, residual)
    return out

  def kinds(self, kinds: Sequence[str], train_levels, test_levels, refs,
            projector: dict[str, Any]) -> dict[str, tuple[list, list]]:
    """{kind: (train levels, test levels)}; projector maps checkpoint kind -> params."""
    train = self.features_of(kinds, train_levels, refs, projector)
    test = self.features_of(kinds, test_levels, refs, projector)
    return {key: (train[key], test[key]) for key in train}


# Settings the reference's scripts give a method for residual features (residual and
# pretrained kinds), under the user's eval.method_settings: its GLASS runs with no adapter
# and a smaller noise there ("residual features don't need adapter and need smaller noise").
RESIDUAL_KIND_SETTINGS = {"glass": {"projection": False, "noise_std": 0.005}}


def method_settings_for(method: str, kind: str, user: dict) -> dict:
  """A method's settings for a feature kind: the reference's per-kind ones, then the user's."""
  base = RESIDUAL_KIND_SETTINGS.get(method, {}) if kind in ("residual", "pretrained") else {}
  return {**base, **dict(user.get(method, {}) or {})}


# Methods that take each test image's own references when config.eval.aligned_references is
# set: the reference's FeatureNorm evaluation (val_norm.py) does, its other methods do not.
ALIGNED_METHODS = ("featurenorm",)


def _within_class(path: str, class_name: str) -> str:
  """The part of an image path after its class folder ('test/ko/0000.bmp'), so that paths of
  the reference's machine and of this one can be matched."""
  parts = path.replace("\\", "/").split("/")
  if class_name not in parts[:-1]:
    return "/".join(parts[-3:])
  last = len(parts) - 2 - parts[:-1][::-1].index(class_name)
  return "/".join(parts[last + 1:])


def aligned_reference_indices(table_path: str, class_name: str, test_paths: Sequence[str],
                              train_paths: Sequence[str]) -> list[list[int]]:
  """Each test image's own reference images, as indices into the training images.

  table_path: the reference's `aligned/references/<dataset>/<class>.json`: {test image path:
  [normal training image paths]}, paths of the machine that made it; they are matched by
  their part below the class folder.
  """
  import json
  try:
    with open(table_path) as f:
      table = json.load(f)
  except (OSError, json.JSONDecodeError) as err:
    raise ValueError(f"aligned references {table_path}: not a readable JSON table ({err})")
  by_test = {_within_class(k, class_name): v for k, v in table.items()}
  train_index = {_within_class(p, class_name): i for i, p in enumerate(train_paths)}
  out = []
  for path in test_paths:
    key = _within_class(path, class_name)
    if key not in by_test:
      raise ValueError(f"aligned references {table_path} list nothing for test image {path} "
                       f"(looked for '{key}')")
    refs = [(r, _within_class(r, class_name)) for r in by_test[key]]
    missing = [r for r, within in refs if within not in train_index]
    if missing:
      raise ValueError(f"aligned references {table_path}: {missing[0]} (for {path}) is not "
                       "among the class's training images (k_shot or noisy settings drop "
                       "images; aligned references need the full training set)")
    out.append([train_index[within] for _, within in refs])
  return out


def reference_features(levels: Sequence[np.ndarray], shots: int,
                       normal: Optional[np.ndarray] = None,
                       class_name: str = "") -> list[np.ndarray]:
  """Every token of the first `shots` normal images: (shots * h * w, C) per level.

  normal: (N,) bool, which training images are normal (the noisy-training setting appends
  anomalous ones); None: all are. When `shots` reaches the number of normal training images,
  every training image is its own reference and every training residual is zero (the k-shot
  settings with k <= shots): the methods then fit on zeros and score test residuals by their
  size. That is the reference's behaviour too; it is logged, not refused.
  """
  count = len(levels[0])
  normal_rows = np.arange(count) if normal is None else np.flatnonzero(np.asarray(normal))
  if len(normal_rows) == 0:
    raise ValueError(f"class {class_name!r}: no normal training image to take references from")
  if shots >= len(normal_rows) and len(normal_rows) == count:
    log.warning("class %r: eval.shots=%d >= its %d training images: every training image is a "
                "reference, so every training residual is zero", class_name, shots, count)
  rows = normal_rows[:shots]
  return [lv[rows].reshape(-1, lv.shape[-1]) for lv in levels]


def class_resize(ev: ml_collections.ConfigDict, class_name: str) -> Optional[int]:
  """The short side a class's images are resized to before the centre crop: its entry in
  `eval.class_resize`, else `eval.resize`; None = the crop size."""
  per_class = dict(ev.get("class_resize", {}) or {})
  return int(per_class.get(class_name, 0)) or int(ev.get("resize", 0)) or None


class GlassTextureSets:
  """GLASS's image-space texture anomalies of one class's training images, featurised, set by
  set: set s is `eval.glass_texture_rounds` R texture-augmented copies of each training image
  (copy r of image i at r * N + i; textures from `eval.glass_textures`, only on the object with
  `eval.glass_foreground`), seeded by the run's seed, the class and s (set 0 by the seed and
  the class alone), featurised as the real images of a feature kind (the class's references,
  the projector). With `eval.glass_texture_refresh` GLASS asks for set s at epoch s R."""

  def __init__(self, config: ml_collections.ConfigDict, maker: FeatureMaker, data: dict,
               class_name: str, train_levels, textures: Sequence[str], method_settings: dict):
    import zlib
    from adjax.methods import get_method
    from data_pipelines import texture_anomalies
    ev = config.eval
    self._maker, self._textures, self._images = maker, textures, data["train_images"]
    self._glass = get_method("glass", **method_settings_for("glass", "original",
                                                             method_settings))
    self._grid = self._glass.token_grid(train_levels)
    self._resize = class_resize(ev, class_name)
    self._rounds = int(ev.get("glass_texture_rounds", 4))
    self._seed = [int(config.seed), zlib.crc32(class_name.encode())]
    # In chunks, keeping only the levels GLASS uses: R x N images of every level and kind at
    # once would take several times the memory of the class's own features.
    self._chunk = max(1, int(ev.get("batch_size", 16))) * 4
    self._foregrounds = None
    if ev.get("glass_foreground", ""):
      # GLASS's masks are for the class's normal training images; an anomalous image mixed
      # into training (eval.noisy_share) has none, and a class without a folder has none.
      self._foregrounds = [None if noisy else texture_anomalies.read_foreground(
          ev.glass_foreground, class_name, path, config.image_size, self._resize)
          for path, noisy in zip(data["train_paths"], data["train_noisy"])]
      if all(f is None for f in self._foregrounds):
        log.info("class %r: no foreground masks under %s; texture anomalies go anywhere",
                 class_name, ev.glass_foreground)

  def features(self, set_index: int, kinds: Sequence[str], refs, projector: dict[str, Any]
               ) -> tuple[dict[str, list], np.ndarray]:
    """({kind key: GLASS's levels (the last num_levels)}, (R N, h, w) token masks on its grid)
    of set `set_index`, for every feature kind in `kinds` (one backbone pass)."""
    from data_pipelines import texture_anomalies
    from adjax.methods.common import last_levels
    rng = np.random.default_rng(self._seed + ([set_index] if set_index else []))
    images, masks = texture_anomalies.synthesize(
        self._images, self._textures, self._grid, rng, rounds=self._rounds,
        foregrounds=self._foregrounds, resize=self._resize)
    parts = []   # per chunk: {kind key: GLASS's levels}
    for start in range(0, len(images), self._chunk):
      levels = self._maker.backbone_levels(images[start:start + self._chunk])
      parts.append({key: [np.asarray(lv) for lv in last_levels(kind_levels,
                                                                 self._glass.num_levels)]
                    for key, kind_levels in self._maker.features_of(kinds, levels, refs,
                                                                    projector).items()})
    return {key: [np.concatenate(level) for level in zip(*(part[key] for part in parts))]
            for key in parts[0]}, masks


def score_method(name: str, settings: dict, train_levels, test_levels, image_size: int,
                 seed: int, test_labels: np.ndarray, test_masks: np.ndarray,
                 state: Any = None, fit_extras: Optional[dict] = None,
                 best_over_test: bool = False
                 ) -> tuple[dict[str, float], np.ndarray, np.ndarray, Any]:
  """Fits (unless `state` is given) and scores one method; returns metrics, scores, maps.

  fit_extras: further keyword arguments of the method's `fit` (GLASS's synthetic anomalies).
  best_over_test: for a method that trains in epochs (`fit_in_rounds`: CFLOW, GLASS), score
    the test set every `test_every` epochs and report each metric's best value over those
    checks, as the reference's scripts do (a selection on the test set: for reproducing its
    tables only). Scores, maps and state are the last check's.
  """
  from adjax.methods import get_method
  method = get_method(name, **settings)
  if len(np.unique(test_labels)) < 2:
    # Image metrics are undefined with one label; NaN keeps the class's pixel metrics and is
    # left out of the means (nanmean), where raising would lose every class evaluated so far.
    log.warning("%s: the test set has only %s images; its image metrics are NaN", name,
                "anomalous" if np.all(test_labels == 1) else "normal")
  test = [jnp.asarray(x) for x in test_levels]
  train = None if train_levels is None else [jnp.asarray(x) for x in train_levels]

  def check(state):
    scores, maps = method.score(state, test, image_size)
    scores, maps = np.asarray(scores, np.float64), np.asarray(maps, np.float32)
    return _metrics(scores, maps, test_labels, test_masks), scores, maps

  if state is None and best_over_test and hasattr(method, "fit_in_rounds"):
    best: dict[str, float] = {}
    for state in method.fit_in_rounds(train, jax.random.PRNGKey(seed), **(fit_extras or {})):
      result, scores, maps = check(state)
      # fmax: a metric that is NaN (one test label) stays NaN, never beats a number.
      best = {k: float(np.fmax(best.get(k, np.nan), v)) for k, v in result.items()}
      log.debug("%s after %d epochs: %s", name, state["epochs"], result)
    return best, scores, maps, state
  if state is None:  # (no training features: a method that fits nothing, e.g. FeatureNorm)
    state = method.fit(train, jax.random.PRNGKey(seed), **(fit_extras or {}))
  result, scores, maps = check(state)
  return result, scores, maps, state


def _metrics(scores: np.ndarray, maps: np.ndarray, test_labels: np.ndarray,
             test_masks: np.ndarray) -> dict[str, float]:
  """image_* metrics (NaN with one test label) and, when a mask is set, pixel_* metrics."""
  from adjax import metrics as metrics_lib
  if len(np.unique(test_labels)) < 2:
    result = {k: float("nan") for k in metrics_lib.IMAGE_METRICS}
  else:
    result = metrics_lib.image_metrics(test_labels, scores)
  result = {f"image_{k}": v for k, v in result.items()}
  if test_masks.any():
    pixel = metrics_lib.pixel_metrics(test_masks, maps)
    result.update({f"pixel_{k}": v for k, v in pixel.items()})
  return result


def load_projectors(workdir: Optional[str], kinds_needed: Sequence[str]) -> dict[str, Any]:
  """The selected projector params of a run: {"angle": params, "norm": params}."""
  out = {}
  for kind in sorted(set(kinds_needed)):
    params, _ = run_layout.load_best(workdir, kind)
    out[kind] = jax.tree.map(jnp.asarray, params)
  return out


def evaluate(config: ml_collections.ConfigDict, workdir: Optional[str],
             out_dir: Optional[str] = None, *, progress: bool = True,
             backbone=None, backbone_params=None) -> dict[str, Any]:
  """Evaluates every method on every class of config.eval, for every feature kind.

  Args:
    config: the run's config (eval.*: format, root, classes, methods, features, shots,
      k_shot, noisy_share, checkpoint, method_settings).
    workdir: a pretraining run (for the projector); may be None when only `original` and
      `residual` features are evaluated.
    out_dir: where tables, heat maps and the t-SNE plot go (default `<workdir>/eval`).

  Returns:
    {"results": {method: {class: {kind: {metric: value}}}}, "seconds": ...}; also written to
    `<out_dir>/results.json`.
  """
  from tqdm import tqdm
  from adjax import reporting
  from adjax.compilation_cache import use_compilation_cache
  from adjax.train import build_backbone, compute_dtype, split_classes
  from data_pipelines.eval_pipeline import load_eval_class
  from data_pipelines.records import read_dataset

  t0 = time.perf_counter()
  ev = config.eval
  use_compilation_cache(config.train.get("compilation_cache", ""))
  if not ev.root:
    raise ValueError("config.eval.root is empty: give the evaluation dataset's folder "
                     "(--config.eval.root=DIR)")
  out_dir = out_dir or os.path.join(workdir or ".", "eval")
  kinds = tuple(ev.features)
  unknown = [k for k in kinds if k not in FEATURE_KINDS]
  if unknown:
    raise ValueError(f"config.eval.features has unknown kinds {unknown}; choose from "
                     f"{FEATURE_KINDS}")
  if "pretrained" in kinds and not workdir:
    raise ValueError("pretrained features need a run: pass --workdir RUN, or evaluate the "
                     "backbone's own features alone with --config.eval.features=original,residual")
  # Config errors before the backbone's weights are read. Names are lower-case from here on
  # (get_method takes any case; the tables, checkpoints and settings are keyed by them).
  methods = tuple(str(m).lower() for m in ev.methods)
  checkpoint_choice = ev.get("checkpoint", "auto")
  for method in methods:
    checkpoint_kind_for(method, checkpoint_choice)
  from adjax.methods import checked_settings, get_method
  method_settings = {str(m).lower(): checked_settings(m, s, f"eval.method_settings.{m}")
                     for m, s in dict(ev.get("method_settings", {}) or {}).items()}
  for method in methods:   # the settings together, as each kind will use them
    for kind in kinds:
      get_method(method, **method_settings_for(method, kind, method_settings))
  textures = None
  if ev.get("glass_textures", "") and "glass" in methods:
    from data_pipelines.texture_anomalies import list_textures
    textures = list_textures(ev.glass_textures)
    if ev.get("glass_foreground", "") and not os.path.isdir(ev.glass_foreground):
      raise FileNotFoundError(f"eval.glass_foreground {ev.glass_foreground!r} is not a folder; "
                              "expected GLASS's foreground masks, <class>/<image name>")
  elif ev.get("glass_foreground", "") and "glass" in methods:
    log.warning("eval.glass_foreground is set but eval.glass_textures is not: foreground "
                "masks only apply to image-space texture anomalies; ignored")
  texture_refresh = bool(ev.get("glass_texture_refresh", False)) and textures is not None
  if ev.get("glass_texture_refresh", False) and textures is None and "glass" in methods:
    log.warning("eval.glass_texture_refresh is set but eval.glass_textures is not: it only "
                "refreshes image-space texture anomalies; ignored")
  projector = {}
  if "pretrained" in kinds:
    projector = load_projectors(workdir, [checkpoint_kind_for(m, checkpoint_choice)
                                          for m in methods])
  if backbone is None:
    backbone, backbone_params = build_backbone(config, workdir)
  maker = FeatureMaker(backbone, backbone_params, dtype=compute_dtype(config),
                       batch_size=int(ev.get("batch_size", 16)),
                       num_heads=config.projector.num_heads,
                       max_similarities=config.train.max_similarities)
  records = read_dataset(ev.format, ev.root, split_classes(ev.classes))
  class_names = sorted({r.class_name for r in records})
  # An interrupted evaluation into the same folder is continued (or refused, with other
  # settings) before any class is evaluated.
  os.makedirs(out_dir, exist_ok=True)
  done_so_far = eval_progress.EvaluationProgress(
      out_dir, eval_progress.evaluation_settings(config, backbone_params, projector), methods,
      class_names, kinds, PER_DATASET_METHODS)
  results, done = done_so_far.results, done_so_far.done
  bar = tqdm(total=len(class_names) * len(methods), desc="evaluate", disable=not progress,
             dynamic_ncols=True)
  aligned_dir = ev.get("aligned_references", "")
  best_over_test = bool(ev.get("best_over_test", False))

  def prepare(class_name: str, pending: Sequence[str]):
    """Features of every kind of a class, and GLASS's texture anomalies if it is pending."""
    data = load_eval_class(records, class_name, image_size=config.image_size,
                           k_shot=ev.k_shot or None, noisy_share=ev.noisy_share,
                           seed=config.seed, resize=class_resize(ev, class_name))
    train_levels = maker.backbone_levels(data["train_images"])
    test_levels = maker.backbone_levels(data["test_images"])
    refs = reference_features(train_levels, int(ev.shots), ~data["train_noisy"], class_name)
    features = maker.kinds(kinds, train_levels, test_levels, refs, projector)
    if aligned_dir and any(m in ALIGNED_METHODS for m in methods):
      table = os.path.join(aligned_dir, f"{class_name}.json")
      references = aligned_reference_indices(table, class_name, data["test_paths"],
                                             data["train_paths"])
      test = maker.aligned_residual_levels(test_levels, train_levels, references)
      if "residual" in kinds:
        features["residual:aligned"] = (None, test)
      for ckpt, params in projector.items():
        features[f"pretrained:{ckpt}:aligned"] = (None, maker.projected_levels(params, test))
    synthetic = None
    if textures is not None and "glass" in pending:
      glass_projector = {k: v for k, v in projector.items()
                         if k == checkpoint_kind_for("glass", checkpoint_choice)}
      sets = GlassTextureSets(config, maker, data, class_name, train_levels, textures,
                              method_settings)
      synthetic = (sets, refs, glass_projector,
                   sets.features(0, kinds, refs, glass_projector))   # set 0, every kind
    return data, features, synthetic

  def feature_key(method: str, kind: str) -> str:
    key = kind if kind != "pretrained" else \
        f"pretrained:{checkpoint_kind_for(method, checkpoint_choice)}"
    if aligned_dir and method in ALIGNED_METHODS and kind != "original":
      key += ":aligned"
    return key

  # UniAD is one model for all classes of a dataset: its training features are gathered while
  # the per-class methods run, and its test features are kept for scoring once it is fitted
  # (one backbone pass over the dataset, not two).
  per_dataset = [m for m in methods if m in PER_DATASET_METHODS]
  gathered: dict[tuple[str, str], list] = {}
  held: list[tuple[str, dict, dict]] = []   # (class, what scoring needs, test features)

  def score(method: str, kind: str, class_name: str, data: dict, train_f, test_f,
            state=None, synthetic=None) -> None:
    settings = method_settings_for(method, kind, method_settings)
    extras = None
    if method == "glass" and synthetic is not None:
      sets, refs, glass_projector, (levels, masks) = synthetic
      key = feature_key(method, kind)
      extras = {"synthetic_levels": levels[key], "synthetic_masks": masks}
      if texture_refresh:
        def refresh(set_index: int, kind=kind, key=key):
          fresh, fresh_masks = sets.features(set_index, [kind], refs, glass_projector)
          return fresh[key], fresh_masks
        extras["synthetic_refresh"] = refresh
    metrics, scores, maps, _ = score_method(method, settings, train_f, test_f,
                                            config.image_size, config.seed,
                                            data["test_labels"], data["test_masks"], state=state,
                                            fit_extras=extras, best_over_test=best_over_test)
    results[method].setdefault(class_name, {})[kind] = metrics
    if kind == kinds[-1] and method == methods[0]:
      reporting.save_overlays(data["test_images"], maps, scores,
                              os.path.join(out_dir, "heatmaps", method, kind, class_name),
                              num=2, masks=data["test_masks"])

  # A per-dataset method is fitted on every class's features: all of it is redone unless done.
  per_dataset = [m for m in per_dataset if not all(done(m, c) for c in class_names)]
  for class_name in class_names:
    pending = [m for m in methods if m not in PER_DATASET_METHODS and not done(m, class_name)]
    bar.update(len(methods) - len(pending) - len(per_dataset))
    if not pending and not per_dataset:
      continue
    data, features, synthetic = prepare(class_name, pending)
    for method in pending:
      for kind in kinds:
        if not done(method, class_name, kind):
          score(method, kind, class_name, data, *features[feature_key(method, kind)],
                synthetic=synthetic)
      done_so_far.save()   # kept if a later method or class fails; a rerun continues it
      bar.update(1)
    if per_dataset:
      keys = {feature_key(m, k) for m in per_dataset for k in kinds}
      for method in per_dataset:
        for kind in kinds:
          gathered.setdefault((method, kind), []).append(features[feature_key(method, kind)][0])
      needs = {"test_labels": data["test_labels"], "test_masks": data["test_masks"],
               "test_images": data["test_images"] if methods[0] in per_dataset else None}
      held.append((class_name, needs, {key: features[key][1] for key in keys}))
    # The plot of the first class evaluated, once (the interrupted run's, if it made it).
    if done_so_far.tsne is None and ev.get("tsne", True):
      _tsne(features, kinds, data["test_masks"], backbone, out_dir, class_name, config)
      done_so_far.tsne = class_name
      done_so_far.save()
    del data, features, synthetic

  if per_dataset:
    for method in per_dataset:
      for kind in kinds:
        model = get_method(method, **method_settings_for(method, kind, method_settings))
        state = model.fit([[jnp.asarray(x) for x in levels]
                           for levels in gathered.pop((method, kind))],
                          jax.random.PRNGKey(config.seed))
        for class_name, needs, test_features in held:
          score(method, kind, class_name, needs, None,
                test_features[feature_key(method, kind)], state=state)
      done_so_far.fitted(method)
      bar.update(len(class_names))
    done_so_far.save()
  bar.close()
  for method in methods:
    for pair in _table_pairs(kinds):
      subset = {c: {k: v for k, v in per_kind.items() if k in pair}
                for c, per_kind in results[method].items()}
      stem = f"results_{method}" if pair[0] == "original" else \
          f"results_{method}_{pair[0]}_vs_{pair[1]}"
      reporting.write_tables(subset, out_dir, stem=stem, kinds=pair,
                             title=f"{method}: {pair[0]} vs {pair[1]} features")
  summary = {"results": results, "classes": class_names, "kinds": list(kinds),
             "methods": list(methods), "seconds": time.perf_counter() - t0,
             # CFLOW's and GLASS's numbers are each metric's best over test-set checks.
             "best_over_test": best_over_test,
             "means": mean_table(results)}
  run_layout.write_json(os.path.join(out_dir, "results.json"), summary)
  done_so_far.finish()
  return summary


def _table_pairs(kinds: Sequence[str]) -> list[tuple[str, str]]:
  """Which feature kinds are compared side by side: original vs pretrained first."""
  pairs = [(a, b) for a, b in (("original", "pretrained"), ("residual", "pretrained"),
                               ("original", "residual")) if a in kinds and b in kinds]
  return pairs[:2] if pairs else []


def mean_table(results: dict) -> dict[str, dict[str, dict[str, float]]]:
  """{method: {kind: {metric: mean over classes}}}."""
  out: dict = {}
  for method, per_class in results.items():
    acc: dict[str, dict[str, list[float]]] = {}
    for per_kind in per_class.values():
      for kind, metrics in per_kind.items():
        for metric, value in metrics.items():
          acc.setdefault(kind, {}).setdefault(metric, []).append(value)
    out[method] = {kind: {m: float(np.nanmean(v)) for m, v in metrics.items()}
                   for kind, metrics in acc.items()}
  return out


def _tsne(features, kinds, masks, backbone, out_dir, class_name, config):
  """The paper's figure: normal vs anomalous test tokens, original beside pretrained."""
  from adjax import reporting
  from adjax.labels import token_labels
  level = len(backbone.level_strides) - 1  # the deepest level
  stride = backbone.level_strides[level]
  _, norm_labels = token_labels(np.asarray(masks, np.float32), patch_size=stride,
                                threshold=0)
  labels = norm_labels.reshape(-1)
  panels = {}
  # The pretrained panel shows the norm-selected projector when it was loaded, else the one
  # the chosen methods loaded (e.g. only the angle-selected one for PatchCore alone).
  pretrained = sorted((k for k in features if k.startswith("pretrained:")),
                      key=lambda k: k != "pretrained:norm")
  for kind in kinds:
    key = kind if kind != "pretrained" else pretrained[0]
    test = features[key][1][level]
    panels[kind] = (test.reshape(-1, test.shape[-1]), labels)
  if labels.sum() > 0:
    reporting.plot_tsne(panels, os.path.join(out_dir, f"tsne_{class_name}.png"),
                        max_points=1000, seed=config.seed, max_iter=500,
                        title=f"{class_name}: test tokens (level {level + 1})")


def make_selection_evaluator(config: ml_collections.ConfigDict, backbone, backbone_params, *,
                             use_test: bool = False) -> Callable[[Any, float], dict]:
  """Checkpoint selection during pretraining: mean image AUROC of PatchCore ("angle") and of
  FeatureNorm ("norm") on pretrained features of the validation classes (or, to reproduce the
  paper, of the test set)."""
  from adjax.train import compute_dtype, split_classes
  from data_pipelines.eval_pipeline import load_eval_class
  from data_pipelines.records import read_dataset
  fmt = config.eval.format if use_test else config.data.val_format
  root = config.eval.root if use_test else config.data.val_root
  classes = split_classes(config.eval.classes if use_test else config.data.val_classes)
  records = read_dataset(fmt, root, classes)
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
                                   data["test_labels"], data["test_masks"])
        scores[kind].append(metrics["image_auroc"])
    return {k: float(np.mean(v)) for k, v in scores.items()}

  return evaluator
