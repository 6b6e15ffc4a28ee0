"""The feature kinds an evaluation compares, made from backbone features: original, residual
(minus the nearest reference feature) and pretrained (the projector on the residuals); the
references they take, and which projector checkpoint and settings each method gets."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adjax import run_layout
from adjax.methods import method_class
from adjax.models.projector import project
from adjax.residual import residual_features

log = logging.getLogger("adjax.evaluate")

FEATURE_KINDS = ("original", "residual", "pretrained")


def checkpoint_kind_for(method: str, choice: str = "auto") -> str:
  """Which selected checkpoint a method uses: the reference's rule, unless forced."""
  if choice == "auto":
    return method_class(method).checkpoint
  if choice not in run_layout.KINDS:
    raise ValueError(f"config.eval.checkpoint must be 'auto', 'angle' or 'norm', got {choice!r}")
  return choice


def method_settings_for(method: str, kind: str, user: dict) -> dict:
  """A method's settings for a feature kind: the ones the reference gives it on residual
  features (the residual and pretrained kinds; `residual_settings` on its class), then the
  user's eval.method_settings."""
  base = method_class(method).residual_settings if kind in ("residual", "pretrained") else {}
  return {**base, **dict(user.get(method, {}) or {})}


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


def load_projectors(workdir: Optional[str], kinds_needed: Sequence[str]) -> dict[str, Any]:
  """The selected projector params of a run: {"angle": params, "norm": params}."""
  out = {}
  for kind in sorted(set(kinds_needed)):
    params, _ = run_layout.load_best(workdir, kind)
    out[kind] = jax.tree.map(jnp.asarray, params)
  return out
