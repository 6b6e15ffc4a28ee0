"""`adjax pretrain`: the training loop of the projector (docs/method.md section 5).

The side effects live here (files, logging, devices, signals); the math is in step.py. A run's
folder follows adjax/run_layout.py. A run started in a folder that has a checkpoint resumes
from it by itself, with the data iterator where it stopped, so that a resumed run ends with the
same parameters as an uninterrupted one. SIGTERM (preemption) saves and exits cleanly.
Checkpoint selection is the caller's: it passes an evaluator (adjax.evaluate.selection).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adjax import run_layout
from adjax.io import files
from adjax import sharding
from adjax import workdir_lock
from adjax.checkpointing import RunCheckpointer, abstract_like
from adjax.compilation_cache import use_compilation_cache
from adjax.configs.validation import validate_config
from adjax.errors import UserError
from adjax.from_config import build_backbone
from adjax.models.projector import init_projector
from adjax.models.reference_attention import attention_record
from adjax.optim import make_optimizer
from adjax.pretrain.derived import (REFERENCES_FILE, _same_classes, bank_slots, compute_centers,
                                    load_centers, load_references, reference_bank)
from adjax.pretrain.image_check import checked_records
from adjax.pretrain.setup import (make_loader, pretrain_records, resolve_augment_place,
                                  step_settings)
from adjax.pretrain.step import init_train_state, make_train_step

log = logging.getLogger("adjax.train")

# (params, epoch) -> {"angle": PatchCore score, "norm": FeatureNorm score}; higher is better.
Evaluator = Callable[[Any, float], dict[str, float]]
# (config, backbone, backbone params) -> an Evaluator, or None when nothing is configured.
EvaluatorFactory = Callable[[ml_collections.ConfigDict, Any, Any], Optional[Evaluator]]


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
      files.truncate_jsonl(self.path, start_step)
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                purge_step=start_step + 1 if start_step else None)
      except ImportError:  # optional: JSON lines are always written
        self.tb = None

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    files.append_jsonl(self.path, {"step": step, **values})
    if self.tb is not None:
      for key, value in values.items():
        if isinstance(value, (int, float)):
          self.tb.add_scalar(key, value, step)
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def pretrain(config: ml_collections.ConfigDict, workdir: str, *,
             make_evaluator: Optional[EvaluatorFactory] = None,
             progress: bool = True) -> dict[str, Any]:
  """Trains the projector; resumes from `<workdir>/checkpoints` when there is one.

  Args:
    config: see adjax/configs/default.py.
    workdir: the run's folder.
    make_evaluator: builds, from the config and the run's backbone, the evaluator (params,
      epoch) -> {"angle": score, "norm": score, ...} used every
      `config.train.eval_every_epochs` to keep the best checkpoint per head (higher is better),
      or None; e.g. `adjax.evaluate.selection.selection_evaluator`, which validates on
      config.data.val_* (or the test set with config.train.select_on == "test"). Without an
      evaluator the final parameters serve as both selections.
    progress: show a progress bar.

  Returns:
    A summary: steps, skipped steps, last metrics, seconds, images/s.
  """
  validate_config(config)   # before the workdir, its config.json or a checkpoint is written
  sharding.maybe_initialize_distributed()
  config = resolve_augment_place(config)
  stale_derived = _check_run_settings(config, workdir)
  # One writer per run folder, from here to the end (an error, Ctrl-C and SIGTERM included).
  with workdir_lock.hold(workdir, "pretrain"):
    return _pretrain(config, workdir, stale_derived, make_evaluator, progress)


def _pretrain(config: ml_collections.ConfigDict, workdir: str, stale_derived: bool,
              make_evaluator: Optional[EvaluatorFactory], progress: bool) -> dict[str, Any]:
  """`pretrain` once the settings are checked and the run's folder is locked."""
  from tqdm import tqdm

  use_compilation_cache(config.train.get("compilation_cache", ""))
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.data_mesh()
  backbone, backbone_params = build_backbone(config, workdir)
  # Every image and mask is decoded once before the first step (or the check of the same files
  # is reused on resume): a damaged file stops the run or is dropped now, not hours in.
  records = checked_records(pretrain_records(config), config, workdir, progress=progress)
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
    centers = None if stale_derived else load_centers(workdir, backbone.level_dims)
    if centers is None:
      centers = compute_centers(config, workdir, backbone=backbone,
                                backbone_params=backbone_params, records=records)

  settings = step_settings(config, backbone, mesh)
  # Resolved (and logged) once here, so the run's folder says which attention it trained with.
  attention = attention_record(settings.attention, level_dims=backbone.level_dims,
                               num_heads=config.projector.num_heads, dtype=settings.compute_dtype)
  if jax.process_index() == 0:
    files.write_json(run_layout.attention_path(workdir), attention)
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
    references = None if stale_derived else load_references(workdir, backbone.level_dims)
    references = references or reference_bank(
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
  if settings.device_augment:
    # Both views are the plain image until the step augments them: send it once.
    batch_keys = tuple(k for k in batch_keys if k != "view2")
  frozen = sharding.replicate(frozen, mesh)
  step_fn = sharding.jit_data_parallel(
      make_train_step(settings, optimizer,
                      functools.partial(backbone.extract, dtype=settings.compute_dtype)), mesh)

  checkpointer = RunCheckpointer(workdir, keep=config.train.keep_checkpoints)
  start_step = 0
  if checkpointer.latest_step() is not None:
    try:  # falls back past damaged steps (moved aside); none left restorable: a UserError
      state, data_state, start_step = checkpointer.restore(abstract_like(state))
    except BaseException:
      checkpointer.close()
      raise
    iterator = loader.resume(data_state, start_step)
    log.info("resumed from step %d", start_step)
  else:
    iterator = iter(loader)
  writer = _MetricWriter(workdir, start_step)
  evaluator = (make_evaluator(config, backbone, backbone_params)
               if make_evaluator is not None else None)
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
      if not os.path.isfile(run_layout.best_meta_path(workdir, kind)):
        continue
      meta = run_layout.load_best_meta(workdir, kind)  # checked: a UserError names a bad one
      if meta.get("selected_by") != "final":
        score = meta.get("score")
        self.best[kind] = -np.inf if score is None else float(score)
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
