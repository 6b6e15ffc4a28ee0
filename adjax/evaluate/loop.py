"""`adjax evaluate`: downstream detectors on original and pretrained features (docs/method.md
section 6).

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

import contextlib
import logging
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adjax.configs.validation import validate_config
from adjax.errors import UserError
from adjax.evaluate import progress as eval_progress
from adjax.evaluate.features import (FEATURE_KINDS, FeatureMaker, aligned_reference_indices,
                                     checkpoint_kind_for, class_resize, load_projectors,
                                     method_settings_for, reference_features)
from adjax.evaluate.synthetic import GlassTextureSets
from adjax.from_config import build_backbone, compute_dtype, split_classes
from adjax import workdir_lock
from adjax.io import files
from adjax.methods import method_class

log = logging.getLogger("adjax.evaluate")


def score_method(name: str, settings: dict, train_levels, test_levels, image_size: int,
                 seed: int, test_labels: np.ndarray, test_masks: np.ndarray,
                 state: Any = None, fit_extras: Optional[dict] = None,
                 best_over_test: bool = False, has_mask: Optional[np.ndarray] = None
                 ) -> tuple[dict[str, float], np.ndarray, np.ndarray, Any]:
  """Fits (unless `state` is given) and scores one method; returns metrics, scores, maps.

  fit_extras: further keyword arguments of the method's `fit` (GLASS's synthetic anomalies).
  best_over_test: for a method that trains in epochs (`fit_in_rounds`: CFLOW, GLASS), score
    the test set every `test_every` epochs and report each metric's best value over those
    checks, as the reference's scripts do (a selection on the test set: for reproducing its
    tables only). Scores, maps and state are the last check's.
  has_mask: (M,) bool, the test images the pixel metrics are computed over (normal images and
    anomalous ones with a mask); None: every image.
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
    return _metrics(scores, maps, test_labels, test_masks, has_mask), scores, maps

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
             test_masks: np.ndarray, has_mask: Optional[np.ndarray] = None
             ) -> dict[str, float]:
  """image_* metrics over every test image (NaN with one test label) and pixel_* metrics over
  the images with a mask (`has_mask`; normal images count, with an all-zero mask), absent when
  none of those masks has an anomalous pixel."""
  from adjax import metrics as metrics_lib
  if len(np.unique(test_labels)) < 2:
    result = {k: float("nan") for k in metrics_lib.IMAGE_METRICS}
  else:
    result = metrics_lib.image_metrics(test_labels, scores)
  result = {f"image_{k}": v for k, v in result.items()}
  if has_mask is not None:
    keep = np.asarray(has_mask, bool)
    test_masks, maps = test_masks[keep], maps[keep]
  if test_masks.any():
    pixel = metrics_lib.pixel_metrics(test_masks, maps)
    result.update({f"pixel_{k}": v for k, v in pixel.items()})
  return result


def evaluate(config: ml_collections.ConfigDict, workdir: Optional[str],
             out_dir: Optional[str] = None, *, progress: bool = True,
             backbone=None, backbone_params=None) -> dict[str, Any]:
  """See _evaluate; the results folder is locked (adjax.workdir_lock) while it is written."""
  with contextlib.ExitStack() as held:
    return _evaluate(config, workdir, out_dir, held, progress=progress, backbone=backbone,
                     backbone_params=backbone_params)


def _evaluate(config: ml_collections.ConfigDict, workdir: Optional[str],
              out_dir: Optional[str], held: contextlib.ExitStack, *, progress: bool = True,
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
  from adjax.evaluate import reporting
  from adjax.compilation_cache import use_compilation_cache
  from data_pipelines.eval_pipeline import load_eval_class
  from data_pipelines.index import read_dataset

  t0 = time.perf_counter()
  validate_config(config, training=False)   # before the backbone, the data or out_dir
  ev = config.eval
  _refuse_moved_glass_settings(ev)
  use_compilation_cache(config.train.get("compilation_cache", ""))
  if not ev.root:
    raise ValueError("config.eval.root is empty: give the evaluation dataset's folder "
                     "(--config.eval.root=DIR)")
  out_dir = out_dir or os.path.join(workdir or ".", "eval")
  # Locked before the slow part (backbone, dataset), so a second evaluation into the same
  # folder, or an --out that cannot be a folder, is refused at once.
  held.enter_context(workdir_lock.hold(out_dir, "evaluate"))
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
  from adjax.methods import checked_settings, get_method, method_inputs
  method_settings = {str(m).lower(): checked_settings(m, s, f"eval.method_settings.{m}")
                     for m, s in dict(ev.get("method_settings", {}) or {}).items()}
  for method in methods:   # the settings together, as each kind will use them
    for kind in kinds:
      get_method(method, **method_settings_for(method, kind, method_settings))
  # The methods that train on image-space texture anomalies (GLASS) when their `textures`
  # input setting (eval.method_settings.glass.textures) names a folder of texture photographs.
  texture_methods = [m for m in methods if method_class(m).synthetic_inputs == "textures"]
  inputs = (method_inputs(texture_methods[0], method_settings.get(texture_methods[0]))
            if texture_methods else {})
  where = f"eval.method_settings.{texture_methods[0]}" if texture_methods else ""
  textures = None
  if inputs.get("textures") and texture_methods:
    from data_pipelines.texture_anomalies import list_textures
    textures = list_textures(inputs["textures"], what=f"{where}.textures")
    if inputs["foreground"] and not os.path.isdir(inputs["foreground"]):
      raise FileNotFoundError(f"{where}.foreground {inputs['foreground']!r} is not a folder; "
                              "expected GLASS's foreground masks, <class>/<image name>")
  elif inputs.get("foreground"):
    log.warning("%s.foreground is set but %s.textures is not: foreground masks only apply to "
                "image-space texture anomalies; ignored", where, where)
  texture_refresh = bool(inputs.get("texture_refresh")) and textures is not None
  if inputs.get("texture_refresh") and textures is None:
    log.warning("%s.texture_refresh is set but %s.textures is not: it only refreshes "
                "image-space texture anomalies; ignored", where, where)
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
  records = read_dataset(ev.format, ev.root, split_classes(ev.classes),
                         masks_optional=bool(ev.get("masks_optional", False)))
  class_names = sorted({r.class_name for r in records})
  # An interrupted evaluation into the same folder is continued (or refused, with other
  # settings) before any class is evaluated.
  os.makedirs(out_dir, exist_ok=True)
  done_so_far = eval_progress.EvaluationProgress(
      out_dir, eval_progress.evaluation_settings(config, backbone_params, projector), methods,
      class_names, kinds, tuple(m for m in methods if method_class(m).per_dataset))
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
    done_so_far.images[class_name] = images = eval_progress.class_images(data)
    if images["anomalous_with_masks"] < images["anomalous_images"]:
      log.warning("%s: %d of %d anomalous test images have no mask; the pixel metrics use the "
                  "%d of %d test images with masks", class_name,
                  images["anomalous_images"] - images["anomalous_with_masks"],
                  images["anomalous_images"], images["images_with_masks"],
                  images["test_images"])
    train_levels = maker.backbone_levels(data["train_images"])
    test_levels = maker.backbone_levels(data["test_images"])
    refs = reference_features(train_levels, int(ev.shots), ~data["train_noisy"], class_name)
    features = maker.kinds(kinds, train_levels, test_levels, refs, projector)
    if aligned_dir and any(method_class(m).aligned_references for m in methods):
      table = os.path.join(aligned_dir, f"{class_name}.json")
      references = aligned_reference_indices(table, class_name, data["test_paths"],
                                             data["train_paths"])
      test = maker.aligned_residual_levels(test_levels, train_levels, references)
      if "residual" in kinds:
        features["residual:aligned"] = (None, test)
      for ckpt, params in projector.items():
        features[f"pretrained:{ckpt}:aligned"] = (None, maker.projected_levels(params, test))
    synthetic = None
    if textures is not None and any(m in texture_methods for m in pending):
      glass_projector = {k: v for k, v in projector.items()
                         if k == checkpoint_kind_for(texture_methods[0], checkpoint_choice)}
      sets = GlassTextureSets(config, maker, data, class_name, train_levels, textures,
                              method_settings)
      synthetic = (sets, refs, glass_projector,
                   sets.features(0, kinds, refs, glass_projector))   # set 0, every kind
    return data, features, synthetic

  def feature_key(method: str, kind: str) -> str:
    key = kind if kind != "pretrained" else \
        f"pretrained:{checkpoint_kind_for(method, checkpoint_choice)}"
    if aligned_dir and method_class(method).aligned_references and kind != "original":
      key += ":aligned"
    return key

  # UniAD is one model for all classes of a dataset: its training features are gathered while
  # the per-class methods run, and its test features are kept for scoring once it is fitted
  # (one backbone pass over the dataset, not two).
  per_dataset = [m for m in methods if method_class(m).per_dataset]
  gathered: dict[tuple[str, str], list] = {}
  held: list[tuple[str, dict, dict]] = []   # (class, what scoring needs, test features)

  def score(method: str, kind: str, class_name: str, data: dict, train_f, test_f,
            state=None, synthetic=None) -> None:
    settings = method_settings_for(method, kind, method_settings)
    extras = None
    if method in texture_methods and synthetic is not None:
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
                                            fit_extras=extras, best_over_test=best_over_test,
                                            has_mask=data["test_has_mask"])
    done_so_far.scored(method, class_name, kind, metrics, scores)
    if kind == kinds[-1] and method == methods[0]:
      reporting.save_overlays(data["test_images"], maps, scores,
                              os.path.join(out_dir, "heatmaps", method, kind, class_name),
                              num=2, masks=data["test_masks"])

  # A per-dataset method is fitted on every class's features: all of it is redone unless done.
  per_dataset = [m for m in per_dataset if not all(done(m, c) for c in class_names)]
  for class_name in class_names:
    pending = [m for m in methods
               if not method_class(m).per_dataset and not done(m, class_name)]
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
               "test_has_mask": data["test_has_mask"],
               "test_images": data["test_images"] if methods[0] in per_dataset else None}
      held.append((class_name, needs, {key: features[key][1] for key in keys}))
    # The plot of the first class evaluated, once (the interrupted run's, if it made it).
    if done_so_far.tsne is None and ev.get("tsne", True):
      _tsne(features, kinds, data["test_masks"], backbone, out_dir, class_name, config,
            has_mask=data["test_has_mask"])
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
  _write_scores(done_so_far, methods, kinds, class_names, out_dir)
  summary = {"results": results, "classes": class_names, "kinds": list(kinds),
             "methods": list(methods), "seconds": time.perf_counter() - t0,
             # CFLOW's and GLASS's numbers are each metric's best over test-set checks.
             "best_over_test": best_over_test,
             "means": mean_table(results),
             # Per class: test images, and those the pixel metrics are computed over.
             "mask_counts": {c: {k: v for k, v in done_so_far.images[c].items()
                                 if k not in ("paths", "labels")} for c in class_names}}
  files.write_json(os.path.join(out_dir, "results.json"), summary)
  done_so_far.finish()
  return summary


def _write_scores(done_so_far, methods: Sequence[str], kinds: Sequence[str],
                  class_names: Sequence[str], out_dir: str) -> None:
  """`scores_<method>_<kind>.csv`: every test image's path, label and score, all classes."""
  from adjax.evaluate import reporting
  for method in methods:
    for kind in kinds:
      rows = []
      for class_name in class_names:
        images = done_so_far.images[class_name]
        scores = done_so_far.scores[method][class_name][kind]
        if len(scores) != len(images["paths"]):
          raise ValueError(f"{class_name}: {len(scores)} {method} {kind} scores for "
                           f"{len(images['paths'])} test images; rerun into another --out")
        rows += zip(images["paths"], images["labels"], scores)
      reporting.write_scores_csv(os.path.join(out_dir, f"scores_{method}_{kind}.csv"), rows)


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


def _tsne(features, kinds, masks, backbone, out_dir, class_name, config, has_mask=None):
  """The paper's figure: normal vs anomalous test tokens, original beside pretrained; the
  anomalous images without a mask are left out (their tokens' labels are unknown)."""
  from adjax.evaluate import reporting
  from adjax.labels import token_labels
  level = len(backbone.level_strides) - 1  # the deepest level
  stride = backbone.level_strides[level]
  keep = np.ones(len(masks), bool) if has_mask is None else np.asarray(has_mask, bool)
  _, norm_labels = token_labels(np.asarray(masks, np.float32)[keep], patch_size=stride,
                                threshold=0)
  labels = norm_labels.reshape(-1)
  panels = {}
  # The pretrained panel shows the norm-selected projector when it was loaded, else the one
  # the chosen methods loaded (e.g. only the angle-selected one for PatchCore alone).
  pretrained = sorted((k for k in features if k.startswith("pretrained:")),
                      key=lambda k: k != "pretrained:norm")
  for kind in kinds:
    key = kind if kind != "pretrained" else pretrained[0]
    test = np.asarray(features[key][1][level])[keep]
    panels[kind] = (test.reshape(-1, test.shape[-1]), labels)
  if labels.sum() > 0:
    reporting.plot_tsne(panels, os.path.join(out_dir, f"tsne_{class_name}.png"),
                        max_points=1000, seed=config.seed, max_iter=500,
                        title=f"{class_name}: test tokens (level {level + 1})")


# Settings of GLASS's texture anomalies that were eval.glass_<name> before they moved under
# eval.method_settings.glass (Glass.input_settings), with their defaults: a run folder written
# before the move still loads (its config.json keeps them, ignored), but one that changed them
# is refused rather than silently evaluated without them.
_MOVED_GLASS_SETTINGS = {"glass_textures": "", "glass_texture_rounds": 4,
                         "glass_texture_refresh": False, "glass_foreground": ""}


def _refuse_moved_glass_settings(ev) -> None:
  changed = [k for k, default in _MOVED_GLASS_SETTINGS.items()
             if k in ev and ev[k] != default]
  if changed:
    new = [f"eval.method_settings.glass.{k[len('glass_'):]}" for k in changed]
    raise UserError(f"{', '.join('eval.' + k for k in changed)} moved to {', '.join(new)}: "
                    "set them there (a config.json written before the move keeps the old names)")
