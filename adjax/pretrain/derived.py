"""What a pretraining run derives once from its data and backbone: the per-level centres of the
angle loss (`centers.npz`) and the precomputed reference bank (`references.npz`), written to the
run's folder and read back on resume."""

from __future__ import annotations

import os
import zipfile
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from adjax import run_layout, workdir_lock
from adjax.configs.validation import validate_config
from adjax.errors import UserError
from adjax.from_config import build_backbone, compute_dtype
from adjax.io import files
from adjax.pretrain.image_check import checked_records
from adjax.pretrain.setup import pretrain_records
from adjax.residual import residual_features


def compute_centers(config: ml_collections.ConfigDict, workdir: str, *, backbone=None,
                    backbone_params=None, records=None) -> list[np.ndarray]:
  """Per-level centre: the mean residual feature of normal images (no augmentation, 4 shots);
  with loss.residual off (an ablation), the mean raw feature, which is then what the projector
  sees.

  For every (dataset, class, view) of the pretraining set, `center_shots` normal images are the
  references and up to `center_images_per_group` other normal images give residuals; the mean
  over all their tokens is the centre. Written to `<workdir>/centers.npz`.
  """
  # `adjax centers` alone locks the run's folder; within `adjax pretrain` it holds it already.
  with workdir_lock.hold(workdir, "centers"):
    return _compute_centers(config, workdir, backbone=backbone,
                            backbone_params=backbone_params, records=records)


def _compute_centers(config: ml_collections.ConfigDict, workdir: str, *, backbone,
                     backbone_params, records) -> list[np.ndarray]:
  from data_pipelines.images import load_record
  validate_config(config)
  if backbone is None:
    backbone, backbone_params = build_backbone(config, workdir)
  records = pretrain_records(config) if records is None else records
  groups: dict[tuple, list] = {}
  for r in records:
    if r.label == 0:
      groups.setdefault((r.dataset, r.class_name, r.view), []).append(r)
  shots = int(config.train.center_shots)
  per_group = int(config.train.get("center_images_per_group", 16))
  rng = np.random.default_rng(config.seed)
  dtype = compute_dtype(config)
  sums: Optional[list[np.ndarray]] = None
  count = 0
  from tqdm import tqdm
  for key in tqdm(sorted(groups), desc="centres", unit="group", dynamic_ncols=True,
                  disable=jax.process_index() != 0):
    members = groups[key]
    if len(members) < shots + 1:
      continue
    order = rng.permutation(len(members))
    refs = [members[i] for i in order[:shots]]
    queries = [members[i] for i in order[shots:shots + per_group]]
    load = lambda rs: np.stack([load_record(r, config.image_size)[0] for r in rs])
    ref_levels = backbone.extract(backbone_params, load(refs) / np.float32(255), dtype)
    query_levels = backbone.extract(backbone_params, load(queries) / np.float32(255), dtype)
    if config.loss.residual:
      inputs = [np.asarray(residual_features(q, r.reshape(-1, r.shape[-1]))[0], np.float64)
                for q, r in zip(query_levels, ref_levels)]
    else:  # the residual-off ablation: the projector sees raw features, so they are centred
      inputs = [np.asarray(q, np.float64) for q in query_levels]
    level_sums = [x.reshape(-1, x.shape[-1]).sum(0) for x in inputs]
    sums = level_sums if sums is None else [a + b for a, b in zip(sums, level_sums)]
    count += len(queries)
  if sums is None:
    raise ValueError(f"no (class, view) of the pretraining set has more than {shots} normal "
                     "images: cannot compute centres")
  tokens = [count * int(np.prod(lv.shape[1:3])) for lv in query_levels]
  centers = [(s / t).astype(np.float32) for s, t in zip(sums, tokens)]
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.atomic_write(run_layout.centers_path(workdir), lambda f: np.savez(
        f, **{f"l{k + 1}": c for k, c in enumerate(centers)}))
  return centers


def load_centers(workdir: str, level_dims: Optional[Sequence[int]] = None
                 ) -> Optional[list[np.ndarray]]:
  """The centres `compute_centers` wrote (None when there are none yet), checked: l1..lK, one
  vector per level, with the level's width when `level_dims` is given.

  Raises:
    UserError: naming the file, when it is not such an .npz (truncated, other keys, shapes).
  """
  path = run_layout.centers_path(workdir)
  if not os.path.isfile(path):
    return None
  arrays = _read_npz(path)
  count = len(level_dims) if level_dims is not None else len(arrays)
  want = [f"l{k + 1}" for k in range(count)]
  if sorted(arrays) != sorted(want):
    raise UserError(f"{path}: expected the arrays {', '.join(want)}, found "
                    f"{', '.join(sorted(arrays)) or 'none'}; {_RECOMPUTE}")
  centers = [arrays[name] for name in want]
  for k, center in enumerate(centers):
    width = None if level_dims is None else int(level_dims[k])
    if center.ndim != 1 or (width is not None and center.shape[0] != width) or \
        not np.issubdtype(center.dtype, np.floating):
      raise UserError(f"{path}: l{k + 1} has shape {center.shape} ({center.dtype}), expected "
                      f"({width if width is not None else 'C'},) floats; {_RECOMPUTE}")
  return centers


_RECOMPUTE = "delete it and the run computes it again"


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """All arrays of an .npz, or a UserError naming it (a truncated zip raises BadZipFile, which
  no caller would think to catch)."""
  try:
    with np.load(path, allow_pickle=False) as data:
      return {name: data[name] for name in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
    raise UserError(f"{path}: not a readable .npz ({type(err).__name__}: "
                    f"{files.one_line(err)}); {_RECOMPUTE}") from err


REFERENCES_FILE = "references.npz"


def precompute_references(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`adjax refs`: writes `<workdir>/references.npz` (see reference_bank) and summarises it."""
  validate_config(config)
  with workdir_lock.hold(workdir, "refs"):
    # The records the run trains on: the unreadable ones dropped as pretraining drops them.
    records = checked_records(pretrain_records(config), config, workdir)
    bank = reference_bank(config, workdir, records=records)
  return {"path": os.path.join(workdir, REFERENCES_FILE),
          "shapes": [list(level.shape) for level in bank["levels"]],
          "class_names": bank["class_names"], "view_names": bank["view_names"]}


def reference_bank(config: ml_collections.ConfigDict, workdir: str, *, backbone=None,
                   backbone_params=None, records=None) -> dict[str, Any]:
  """Backbone features of `data.max_shots` normal images per (dataset, class, view), computed
  once.

  With `train.precomputed_refs`, every step takes its images' references from this bank
  (the first n_shot of the group's shots other than the image itself: the bank holds
  max_shots + 1 images per group for that, distinct as far as the group has images) instead
  of running the backbone on reference images: a fixed reference set, the same for every step
  of the run (each sweep point computes its own, from the same seed: the same images when the
  points share data settings). Written
  to `<workdir>/references.npz`: l{k} of shape (G, max_shots + 1, h, w, C_k) with G = classes x
  views (the loader's class_id * len(views) + view_id), `paths` (G, max_shots + 1) of the
  images, and the class and view names.
  """
  from data_pipelines.images import load_record
  if backbone is None:
    backbone, backbone_params = build_backbone(config, workdir)
  records = pretrain_records(config) if records is None else records
  class_names = sorted({r.class_key for r in records})   # "dataset/class", as the loader
  view_names = sorted({r.view for r in records})
  shots = int(config.data.max_shots) + 1   # one spare: an image is never its own reference
  rng = np.random.default_rng([config.seed, 7])
  dtype = compute_dtype(config)
  bank: Optional[list[np.ndarray]] = None
  paths = np.full((len(class_names) * len(view_names), shots), "", dtype=object)
  pools: dict[tuple[str, str], list] = {}   # the normal images of each (class, view), once
  for r in records:
    if r.label == 0:
      pools.setdefault((r.class_key, r.view), []).append(r)
  from tqdm import tqdm
  for ci, class_name in enumerate(tqdm(class_names, desc="references", unit="class",
                                       dynamic_ncols=True, disable=jax.process_index() != 0)):
    for vi, view in enumerate(view_names):
      pool = pools.get((class_name, view), [])
      if not pool:
        continue
      # Distinct images as far as the pool goes; repeats only beyond it.
      order = rng.permutation(len(pool))[:shots]
      if len(order) < shots:
        order = np.concatenate([order, rng.choice(len(pool), size=shots - len(order))])
      chosen = [pool[i] for i in order]
      images = np.stack([load_record(r, config.image_size)[0] for r in chosen])
      levels = backbone.extract(backbone_params, images / np.float32(255), dtype)
      if bank is None:
        bank = [np.zeros((len(class_names) * len(view_names), *lv.shape), np.float32)
                for lv in levels]
      for k, lv in enumerate(levels):
        bank[k][ci * len(view_names) + vi] = np.asarray(lv)
      paths[ci * len(view_names) + vi] = [r.image_path for r in chosen]
  if bank is None:
    raise ValueError("the pretraining set has no normal image to take references from")
  paths = paths.astype(str)   # a plain string array: .npz files load without pickle
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.atomic_write(os.path.join(workdir, REFERENCES_FILE), lambda f: np.savez(
        f, class_names=np.asarray(class_names), view_names=np.asarray(view_names),
        paths=paths, **{f"l{k + 1}": b for k, b in enumerate(bank)}))
  return {"levels": bank, "class_names": class_names, "view_names": view_names,
          "paths": paths}


def bank_slots(image_paths: Sequence[str], groups: np.ndarray,
               bank_paths: np.ndarray) -> np.ndarray:
  """(B, S_max + 1) bool: the slots of each image's group in the reference bank that hold the
  image itself (several when a small group's bank repeats images)."""
  return np.stack([bank_paths[int(group)] == path
                   for path, group in zip(image_paths, groups)]).astype(bool)


def _same_classes(bank_names: list[str], loader_names: list[str]) -> bool:
  """Whether a reference bank's groups are the loader's: the same "dataset/class" names, or a
  bank from before the names carried the dataset whose bare names map one to one (a run
  resumed across that change keeps its bank)."""
  if list(bank_names) == list(loader_names):
    return True
  bare = [name.split("/", 1)[-1] for name in loader_names]
  return len(set(bare)) == len(bare) and list(bank_names) == bare


def load_references(workdir: str, level_dims: Optional[Sequence[int]] = None
                    ) -> Optional[dict[str, Any]]:
  """The bank `reference_bank` wrote (None when there is none yet), checked against the layout
  it writes: class and view names, `paths` (G, S + 1) and l1..lK (G, S + 1, h, w, C_k) with
  G = classes x views (and C_k the level's width when `level_dims` is given).

  Raises:
    UserError: naming the file, when it is not such an .npz.
  """
  path = os.path.join(workdir, REFERENCES_FILE)
  if not os.path.isfile(path):
    return None
  data = _read_npz(path)
  if "paths" not in data:
    raise UserError(f"{path} was made by an older adjax (no image paths, and no spare "
                    "image per group to keep an image from being its own reference); delete "
                    "it, or run `adjax refs` again")
  missing = [k for k in ("class_names", "view_names") if k not in data]
  count = len([k for k in data if k not in ("class_names", "view_names", "paths")])
  names = [f"l{k + 1}" for k in range(count)]
  if missing or not count or any(name not in data for name in names) or (
      level_dims is not None and count != len(level_dims)):
    raise UserError(f"{path}: expected class_names, view_names, paths and l1..l"
                    f"{len(level_dims) if level_dims is not None else 'K'}, found "
                    f"{', '.join(sorted(data))}; {_RECOMPUTE}")
  levels = [data[name] for name in names]
  class_names, view_names, paths = (list(data["class_names"]), list(data["view_names"]),
                                    data["paths"])
  groups = len(class_names) * len(view_names)
  if paths.ndim != 2 or paths.shape[0] != groups:
    raise UserError(f"{path}: paths has shape {paths.shape}, expected ({groups}, shots) for "
                    f"{len(class_names)} classes x {len(view_names)} views; {_RECOMPUTE}")
  for k, level in enumerate(levels):
    width = None if level_dims is None else int(level_dims[k])
    if level.ndim != 5 or level.shape[:2] != paths.shape or (
        width is not None and level.shape[-1] != width):
      raise UserError(f"{path}: l{k + 1} has shape {level.shape}, expected ({paths.shape[0]}, "
                      f"{paths.shape[1]}, h, w, {width if width is not None else 'C'}); "
                      f"{_RECOMPUTE}")
  return {"levels": levels, "class_names": class_names, "view_names": view_names,
          "paths": paths}
