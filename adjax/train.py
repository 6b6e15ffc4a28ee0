"""Pretraining runs: `adjax centers`, `adjax refs` and `adjax pretrain` (SPEC section 5).

The side effects live here (files, logging, devices, signals); the math is in train_step.py.
A run's folder follows adjax/run_layout.py. A run started in a folder that has a checkpoint
resumes from it by itself, with the data iterator where it stopped, so that a resumed run ends
with the same parameters as an uninterrupted one. SIGTERM (preemption) saves and exits cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from adjax import run_layout
from adjax import sharding
from adjax.compilation_cache import use_compilation_cache
from adjax.errors import UserError
from adjax.models.projector import init_projector
from adjax.optim import make_optimizer
from adjax.residual import residual_features
from adjax.train_step import StepSettings, init_train_state, make_train_step

log = logging.getLogger("adjax.train")

_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------ building blocks
def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  if config.train.dtype not in _COMPUTE_DTYPES:
    raise ValueError(f"config.train.dtype must be one of {sorted(_COMPUTE_DTYPES)}, got "
                     f"{config.train.dtype!r}")
  return _COMPUTE_DTYPES[config.train.dtype]


def build_backbone(config: ml_collections.ConfigDict, workdir: Optional[str] = None):
  """(backbone, params) from config.backbone: the user's weights file, the packaged
  EfficientNet-Lite0 weights, or random weights for the test backbone `tiny-vit`."""
  from adjax.models.backbones import get_backbone
  overrides = {}
  if config.backbone.get("taps"):
    overrides["taps"] = tuple(config.backbone.taps)
  backbone = get_backbone(config.backbone.name, **overrides)
  weights = config.backbone.weights
  cache_dir = config.backbone.cache_dir or None
  if weights:
    params = backbone.load(weights, cache_dir=cache_dir)
  elif config.backbone.name == "efficientnet-lite0":
    from adjax.models.backbones.efficientnet import default_weights_path
    params = backbone.load(default_weights_path(), cache_dir=cache_dir)
  elif config.backbone.name == "tiny-vit":
    params = backbone.init(jax.random.PRNGKey(config.seed))
  else:
    raise ValueError(f"backbone {config.backbone.name!r} needs its weights: pass "
                     "--config.backbone.weights=FILE (.pth, .pt or .safetensors)")
  return backbone, params


def split_classes(value: str) -> Optional[list[str]]:
  """A comma-separated class list from the config; None (every class) when empty."""
  return run_layout.comma_list(value) or None


def _distinct_paths(paths: list[str], setting: str) -> None:
  """Refuses a folder or pack named twice: it would be read twice, as two datasets."""
  seen = {}
  for path in paths:
    key = os.path.realpath(os.path.expanduser(path))
    if key in seen:
      raise UserError(f"{setting} names {seen[key]!r} and {path!r}, the same place twice: "
                      "each dataset once")
    seen[key] = path


def pretrain_records(config: ml_collections.ConfigDict) -> list:
  """The pretraining index: packed ArrayRecord shards or dataset folders.

  Several datasets merge into one index: comma-separated `data.pretrain_root` folders (with
  one `data.pretrain_format`, or one per folder) or `data.pretrain_tfds_dir` packs. Reference
  images are drawn within (dataset, class, view), so datasets that share a class name stay
  apart; two folders or packs of one format are told apart as "<format>#<position>" (1-based,
  in the list). `data.pretrain_classes` may name a class as "dataset/class".
  """
  from data_pipelines import records as records_lib
  classes = split_classes(config.data.pretrain_classes)
  qualified = bool(classes) and any("/" in c for c in classes)
  if config.data.get("pretrain_tfds_dir"):
    from data_pipelines.tfds_builders import packed_records
    packs = split_classes(config.data.pretrain_tfds_dir)
    _distinct_paths(packs, "config.data.pretrain_tfds_dir")
    per_source = [packed_records(pack) for pack in packs]
    records = _merge_sources([r[0].dataset if r else "" for r in per_source], per_source)
    if classes:
      # As the folder readers do: a requested class that is not there is an error, not a
      # silently smaller pretraining set.
      records = _only_classes(records, classes, config.data.pretrain_tfds_dir)
  else:
    roots = split_classes(config.data.pretrain_root)
    if not roots:
      raise ValueError("config.data.pretrain_root is empty: give the pretraining dataset's "
                       "folder (--config.data.pretrain_root=DIR)")
    _distinct_paths(roots, "config.data.pretrain_root")
    formats = split_classes(config.data.pretrain_format) or []
    if len(formats) == 1:
      formats = formats * len(roots)
    if len(formats) != len(roots):
      raise UserError(f"config.data.pretrain_format names {len(formats)} formats for "
                      f"{len(roots)} folders in config.data.pretrain_root: give one format, "
                      "or one per folder (comma-separated, in the same order)")
    if len(roots) == 1 and not qualified:
      records = records_lib.read_dataset(formats[0], roots[0], classes)
    else:
      records = _merge_sources(formats, [records_lib.read_dataset(fmt, root)
                                         for fmt, root in zip(formats, roots)])
      if classes:
        records = _only_classes(records, classes, config.data.pretrain_root)
  if not records:
    raise ValueError(f"no pretraining images found in {config.data.pretrain_root!r}")
  return records


def _merge_sources(formats: list[str], per_source: list[list]) -> list:
  """One sorted index of several sources; a format that comes more than once gets its
  position in the list ("mvtec#2"), so that its folders stay different datasets."""
  repeated = {f for f in formats if formats.count(f) > 1}
  merged = []
  for position, (fmt, records) in enumerate(zip(formats, per_source), start=1):
    if fmt in repeated:
      records = [dataclasses.replace(r, dataset=f"{fmt}#{position}") for r in records]
    merged.extend(records)
  return sorted(merged)


def _only_classes(records: list, classes: list[str], where: str) -> list:
  """The records of the named classes ("class" or "dataset/class"); naming one that is not
  there is an error."""
  kept = [r for r in records if r.class_name in classes or r.class_key in classes]
  found = {r.class_name for r in kept} | {r.class_key for r in kept}
  missing = [c for c in classes if c not in found]
  if missing:
    raise UserError(f"config.data.pretrain_classes names {missing}, which {where} does not "
                    f"hold; it has {sorted({r.class_key for r in records})}")
  return kept


def step_settings(config: ml_collections.ConfigDict, backbone,
                  mesh: Optional[Mesh] = None) -> StepSettings:
  """The compiled step's settings from a run config; `mesh` splits the angle loss's rows."""
  return StepSettings(
      level_strides=tuple(backbone.level_strides), num_heads=config.projector.num_heads,
      temperature=config.loss.temperature, use_angle=config.loss.angle,
      use_norm=config.loss.norm, use_center=config.loss.center,
      use_residual=config.loss.residual, angle_block_size=config.loss.angle_block_size,
      label_threshold_share=config.data.label_threshold_share,
      max_similarities=config.train.max_similarities, compute_dtype=compute_dtype(config),
      mesh=mesh)


def make_loader(config: ml_collections.ConfigDict, records: Sequence, backbone, *,
                load_references: bool = True):
  """This process's pretraining loader (its shard of the data, its share of the batch)."""
  from data_pipelines.pretrain_pipeline import make_pretrain_loader
  processes = jax.process_count()
  if config.data.batch_size % jax.device_count():
    raise ValueError(f"config.data.batch_size={config.data.batch_size} must be a multiple of "
                     f"the device count {jax.device_count()}")
  patch = max(backbone.level_strides)
  return make_pretrain_loader(
      records, image_size=config.image_size, batch_size=config.data.batch_size // processes,
      shots=tuple(config.data.shots), max_shots=config.data.max_shots,
      anomaly_share=config.data.anomaly_share or None, augment=config.data.augment,
      patch_size=patch, label_threshold=int(config.data.label_threshold_share * patch * patch),
      seed=config.seed, shard_index=jax.process_index(), shard_count=processes,
      num_workers=config.data.num_workers, load_references=load_references)


# ------------------------------------------------------------------------ centres
def compute_centers(config: ml_collections.ConfigDict, workdir: str, *, backbone=None,
                    backbone_params=None, records=None) -> list[np.ndarray]:
  """Per-level centre: the mean residual feature of normal images (no augmentation, 4 shots);
  with loss.residual off (an ablation), the mean raw feature, which is then what the projector
  sees.

  For every (dataset, class, view) of the pretraining set, `center_shots` normal images are the
  references and up to `center_images_per_group` other normal images give residuals; the mean
  over all their tokens is the centre. Written to `<workdir>/centers.npz`.
  """
  from data_pipelines.images import load_record
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
    run_layout.atomic_write(run_layout.centers_path(workdir), lambda f: np.savez(
        f, **{f"l{k + 1}": c for k, c in enumerate(centers)}))
  return centers


def load_centers(workdir: str) -> Optional[list[np.ndarray]]:
  path = run_layout.centers_path(workdir)
  if not os.path.isfile(path):
    return None
  with np.load(path) as data:
    return [data[f"l{k + 1}"] for k in range(len(data.files))]


# ------------------------------------------------------------------------ references
REFERENCES_FILE = "references.npz"


def precompute_references(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`adjax refs`: writes `<workdir>/references.npz` (see reference_bank) and summarises it."""
  bank = reference_bank(config, workdir)
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
    run_layout.atomic_write(os.path.join(workdir, REFERENCES_FILE), lambda f: np.savez(
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


def load_references(workdir: str) -> Optional[dict[str, Any]]:
  path = os.path.join(workdir, REFERENCES_FILE)
  if not os.path.isfile(path):
    return None
  with np.load(path) as data:
    if "paths" not in data.files:
      raise UserError(f"{path} was made by an older adjax (no image paths, and no spare "
                      "image per group to keep an image from being its own reference); delete "
                      "it, or run `adjax refs` again")
    levels = [data[f"l{k + 1}"] for k in range(len(data.files) - 3)]
    return {"levels": levels, "class_names": list(data["class_names"]),
            "view_names": list(data["view_names"]), "paths": data["paths"]}


# ------------------------------------------------------------------------ the run
class _Preemption:
  """When the run must save and exit on SIGTERM (preemption): `due(step)`.

  One process: SIGTERM sets a flag that the loop reads after the step. Several processes: the
  signal may reach one host only, or the hosts at different steps; a host that stopped alone
  would leave the others waiting in the next step's collectives (or in the checkpoint's). JAX's
  preemption service (started by jax.distributed.initialize, listening for SIGTERM itself)
  agrees on one step for every host: `reached_preemption_sync_point`, called every step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._synced = jax.process_count() > 1 and _preemption_service_running()

  def __enter__(self):
    if self._synced:  # the service's own handler must keep SIGTERM
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def due(self, step: int) -> bool:
    if self._synced:
      from jax.experimental import multihost_utils
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _preemption_service_running() -> bool:
  from jax._src import distributed  # the one place JAX keeps it; no public accessor
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


@contextlib.contextmanager
def _closing(checkpointer):
  """Closes the checkpointer however the loop ends: on Ctrl-C or an error too, an asynchronous
  save in flight is finished instead of abandoned."""
  try:
    yield checkpointer
  finally:
    checkpointer.close()


class _MetricWriter:
  """metrics.jsonl and TensorBoard event files, written by process 0 only."""

  def __init__(self, workdir: str, start_step: int = 0):
    """start_step: the step the run resumes from; what was logged after it (before a crash
    that lost the later checkpoints) is dropped, as it is about to be logged again."""
    self.enabled = jax.process_index() == 0
    self.path = run_layout.metrics_path(workdir)
    self.tb = None
    if self.enabled:
      run_layout.truncate_jsonl(self.path, start_step)
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                purge_step=start_step + 1 if start_step else None)
      except ImportError:  # optional: JSON lines are always written
        self.tb = None

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    run_layout.append_jsonl(self.path, {"step": step, **values})
    if self.tb is not None:
      for key, value in values.items():
        if isinstance(value, (int, float)):
          self.tb.add_scalar(key, value, step)
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def pretrain(config: ml_collections.ConfigDict, workdir: str, *,
             evaluator=None, progress: bool = True) -> dict[str, Any]:
  """Trains the projector; resumes from `<workdir>/checkpoints` when there is one.

  Args:
    config: see adjax/configs.py.
    workdir: the run's folder.
    evaluator: optional callable (params, epoch) -> {"angle": score, "norm": score, ...} used
      every `config.train.eval_every_epochs` to keep the best checkpoint per head (higher is
      better); by default built from config.data.val_* (or the test set with
      config.train.select_on == "test") when those are set.
    progress: show a progress bar.

  Returns:
    A summary: steps, skipped steps, last metrics, seconds, images/s.
  """
  from tqdm import tqdm
  from adjax.checkpointing import RunCheckpointer, abstract_like

  sharding.maybe_initialize_distributed()
  stale_derived = _check_run_settings(config, workdir)
  use_compilation_cache(config.train.get("compilation_cache", ""))
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.data_mesh()
  backbone, backbone_params = build_backbone(config, workdir)
  records = pretrain_records(config)
  precomputed = bool(config.train.get("precomputed_refs", False)) and config.loss.residual
  loader = make_loader(config, records, backbone, load_references=not precomputed)
  # Written once the config has proved usable (weights, data): a failed attempt leaves the
  # run's config.json as it was.
  if jax.process_index() == 0:
    run_layout.save_config(workdir, config)
  steps_per_epoch = max(1, len(loader))
  total_steps = int(config.optim.epochs) * steps_per_epoch
  if config.optim.max_steps:
    total_steps = min(total_steps, int(config.optim.max_steps))

  centers = None
  if config.loss.center and config.loss.angle:
    centers = None if stale_derived else load_centers(workdir)
    if centers is None:
      centers = compute_centers(config, workdir, backbone=backbone,
                                backbone_params=backbone_params, records=records)

  settings = step_settings(config, backbone, mesh)
  optimizer = make_optimizer(config.optim.lr, config.optim.weight_decay, steps_per_epoch,
                             tuple(config.optim.decay_epochs), config.optim.decay_factor)
  params = init_projector(jax.random.PRNGKey(config.seed), backbone.level_dims,
                          num_heads=config.projector.num_heads,
                          num_ref_tokens=config.projector.num_ref_tokens,
                          depth=config.projector.depth)
  state = sharding.replicate(init_train_state(params, optimizer,
                                              jax.random.PRNGKey(config.seed + 1)), mesh)
  frozen = {"backbone": backbone_params,
            "centers": None if centers is None else [jnp.asarray(c) for c in centers]}
  batch_keys = ("view1", "view2", "masks", "refs", "ref_valid")
  num_views = 1
  if precomputed:
    references = (None if stale_derived else load_references(workdir)) or reference_bank(
        config, workdir, backbone=backbone, backbone_params=backbone_params, records=records)
    if (not _same_classes(references["class_names"], loader.class_names) or
        references["view_names"] != list(loader.view_names)):
      raise ValueError(f"{os.path.join(workdir, REFERENCES_FILE)} was made for other classes or"
                       " views than the pretraining set; delete it or run `adjax refs` again")
    num_views = len(references["view_names"])
    frozen["ref_bank"] = [b.reshape(b.shape[0], b.shape[1], -1, b.shape[-1])
                          for b in references["levels"]]
    batch_keys = ("view1", "view2", "masks", "ref_valid", "ref_group", "ref_self")
    record_paths = np.asarray([r.image_path for r in loader.plan.records])
  frozen = sharding.replicate(frozen, mesh)
  step_fn = sharding.jit_data_parallel(
      make_train_step(settings, optimizer, backbone.extract), mesh)

  checkpointer = RunCheckpointer(workdir, keep=config.train.keep_checkpoints)
  start_step = 0
  if checkpointer.latest_step() is not None:
    state, data_state, start_step = checkpointer.restore(abstract_like(state))
    iterator = loader.resume(data_state, start_step)
    log.info("resumed from step %d", start_step)
  else:
    iterator = iter(loader)
  writer = _MetricWriter(workdir, start_step)
  evaluator = evaluator if evaluator is not None else _default_evaluator(
      config, backbone, backbone_params)
  best = _BestTracker(workdir)
  images_per_step = config.data.batch_size
  bar = tqdm(total=total_steps, initial=start_step, disable=not progress or
             jax.process_index() != 0, desc="pretrain", unit="step", dynamic_ncols=True)
  last_metrics: dict[str, float] = {}
  t_start, steps_done = time.perf_counter(), 0
  step = start_step
  with _Preemption() as preemption, _closing(checkpointer):
    while step < total_steps:
      local = next(iterator)
      local["ref_group"] = local["class_id"] * num_views + local["view_id"]
      if precomputed:
        local["ref_self"] = bank_slots(record_paths[local["record"]], local["ref_group"],
                                       references["paths"])
      batch = sharding.global_batch({k: local[k] for k in batch_keys}, mesh)
      state, metrics = step_fn(state, batch, frozen)
      step += 1
      steps_done += 1
      bar.update(1)
      if step % config.train.log_every == 0 or step == total_steps:
        last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - t_start
        last_metrics["images_per_s"] = steps_done * images_per_step / max(elapsed, 1e-9)
        last_metrics["epoch"] = step / steps_per_epoch
        writer.write(step, last_metrics)
        bar.set_postfix({k: f"{last_metrics[k]:.4g}" for k in ("loss", "images_per_s")}
                        | {"skipped": int(last_metrics["skipped"])})
      if evaluator is not None and _evaluation_due(step, steps_per_epoch, total_steps,
                                                   config.train.eval_every_epochs):
        scores = evaluator(jax.device_get(state["params"]), step / steps_per_epoch)
        writer.write(step, {f"val/{k}": float(v) for k, v in scores.items()})
        best.update(step, jax.device_get(state["params"]), scores)
      saved = step % config.train.checkpoint_every == 0 or step == total_steps
      if saved:
        checkpointer.save(step, state, loader.state(iterator))
      if preemption.due(step):
        log.warning("SIGTERM: saving step %d and exiting", step)
        if not saved:  # orbax refuses a second save of the same step
          checkpointer.save(step, state, loader.state(iterator), force=True)
        break
  bar.close()
  writer.close()
  seconds = time.perf_counter() - t_start
  summary = {"steps": step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
             "skipped": int(jax.device_get(state["skipped"])), "seconds": seconds,
             "images_per_s": steps_done * images_per_step / max(seconds, 1e-9),
             "preempted": step < total_steps, "last": last_metrics}
  if (not best.evaluated and jax.process_index() == 0 and step == total_steps
      and steps_done > 0):  # (a rerun of a finished run trains nothing and keeps them)
    # No evaluator: the final parameters serve as both selections.
    for kind in run_layout.KINDS:
      run_layout.save_best(workdir, kind, jax.device_get(state["params"]),
                           {"step": step, "metrics": last_metrics, "selected_by": "final"})
  return summary


def _check_run_settings(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Refuses, before anything is computed or written, settings that cannot work and a config
  that would turn the run in `workdir` into another one. Returns True when the workdir's
  derived files (centres, reference bank) come from other settings and must be recomputed."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a run folder")
  for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
    value = config.train[key]
    if not isinstance(value, int) or value < 1:
      raise UserError(f"config.train.{key} must be an integer >= 1, got {value!r}")
  changes = run_layout.config_changes(workdir, config)
  if not changes:
    return False
  if run_layout.has_checkpoint(workdir):
    resumable = run_layout.RESUMABLE_CHANGES + tuple(f"{s}*" for s in
                                                     run_layout.RESUMABLE_SECTIONS)
    raise UserError(f"{workdir} holds a run with other settings: {'; '.join(changes)}. Resume "
                    f"it with its own settings (only {', '.join(resumable)} may change) or "
                    "start the new one in another --workdir")
  # No checkpoint yet (an attempt that failed before its first save, e.g. out of memory):
  # nothing to resume, so the new settings start afresh, and what the attempt derived from
  # its own settings (centres, reference bank) is computed again (the caller skips them).
  log.warning("%s: no checkpoint yet; starting afresh with changed settings (%s)", workdir,
              "; ".join(changes))
  return True


def final_params(workdir: str) -> Any:
  """The projector parameters of the latest checkpoint (numpy)."""
  from adjax.export import read_run_params
  return read_run_params(workdir, "latest")[0]


def _evaluation_due(step: int, steps_per_epoch: int, total_steps: int, every: int) -> bool:
  """At the end of every `every`-th epoch, and always at the last step."""
  if step == total_steps:
    return True
  return bool(every) and step % steps_per_epoch == 0 and (step // steps_per_epoch) % every == 0


class _BestTracker:
  """Keeps `<workdir>/best/{angle,norm}` as the parameters with the highest score so far.

  The reference selects its `*_angle` checkpoint with PatchCore and `*_norm` with FeatureNorm;
  scores here are {"angle": PatchCore score, "norm": FeatureNorm score}.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    # Whether an evaluation selected anything in this run (now or before a resume). If not,
    # the final parameters serve as both selections, also when a finished run is extended
    # (its previous final parameters are then replaced).
    self.evaluated = False
    self.best: dict[str, float] = {}
    for kind in run_layout.KINDS:
      meta_path = run_layout.best_meta_path(workdir, kind)
      if os.path.isfile(meta_path):
        meta = run_layout.read_json(meta_path)
        if meta.get("selected_by") != "final":
          self.best[kind] = float(meta.get("score", -np.inf))
          self.evaluated = True

  def update(self, step: int, params: Any, scores: dict[str, float]) -> None:
    if jax.process_index() != 0:
      return
    for kind in run_layout.KINDS:
      if kind in scores and scores[kind] > self.best.get(kind, -np.inf):
        self.best[kind] = float(scores[kind])
        run_layout.save_best(self.workdir, kind, params,
                             {"step": step, "score": float(scores[kind]), "metrics": scores})
        self.evaluated = True


def _default_evaluator(config, backbone, backbone_params):
  """Validation with PatchCore (angle head) and FeatureNorm (norm head), when configured."""
  use_test = config.train.select_on == "test"
  if config.train.select_on not in ("validation", "test"):
    raise ValueError(f"config.train.select_on must be 'validation' or 'test', got "
                     f"{config.train.select_on!r}")
  root = config.eval.root if use_test else config.data.val_root
  if not root or not config.train.eval_every_epochs:
    return None
  from adjax.evaluate import make_selection_evaluator
  return make_selection_evaluator(config, backbone, backbone_params, use_test=use_test)
