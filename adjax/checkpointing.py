"""Orbax checkpoints of a pretraining run: train state and data-iterator state together.

`<workdir>/checkpoints/<step>/` holds two items: "state" (projector params, optimiser state,
step, skipped count, rng) and "data" (JSON: the grain iterator's state and the loader's worker
count, `PretrainLoader.state`). Saves are
asynchronous; orbax writes each step to a temporary folder and renames it when complete, so a
run killed at any moment resumes from its last complete step. The latest N are kept. A step
that cannot be restored all the same (a file truncated or lost afterwards, a stray folder) is
moved to `<workdir>/checkpoints_corrupt/` and the resume falls back to the step before it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from adjax import run_layout
from adjax.errors import UserError
from adjax.io import files

log = logging.getLogger("adjax.checkpointing")

Params = dict[str, Any]
# The projector parameters a run offers: the two selected checkpoints and the newest one.
WHICH = ("angle", "norm", "latest")


class RunCheckpointer:
  """Saves and restores (state, data_state) under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.workdir = workdir
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save)
    # Orbax refuses relative paths (late, when an asynchronous save finalises).
    self.directory = os.path.abspath(run_layout.checkpoints_dir(workdir))
    self.manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Any, *, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, Any, int]:
    """(state placed as abstract_state's shardings, data_state, step) of `step` or the latest
    one that can be restored.

    Without `step`, a step that cannot be restored (a truncated or missing file, an empty or
    stray folder, anything orbax raises on it) is moved to `<workdir>/checkpoints_corrupt/`
    with a warning, and the next older one is tried: a run whose last save was damaged (a full
    disk, a copy cut short) resumes from the one before instead of not at all. Nothing is
    deleted, so a step moved aside by mistake can be moved back.

    Raises:
      UserError: no step restores (naming the folder and where the damaged ones went), or the
        given `step` does not.
    """
    _quiet_orbax_leftovers()
    if step is not None:
      try:
        return self._restore_step(abstract_state, step)
      except Exception as err:  # orbax and tensorstore raise many types, some plain Exception
        _reraise_if_machine_error(err)
        raise UserError(f"cannot restore checkpoint {self._step_dir(step)}: "
                        f"{_reason(err)}") from err
    moved = []
    for candidate in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self._restore_step(abstract_state, candidate)
      except Exception as err:  # see above: any failure of this step's files
        _reraise_if_machine_error(err)
        target = self._set_aside(candidate)
        moved.append(target)
        log.warning("checkpoint %s cannot be restored (%s); moved it to %s and trying the "
                    "previous one", self._step_dir(candidate), _reason(err), target)
    if moved:
      raise UserError(f"no checkpoint in {self.directory} can be restored; the damaged steps "
                      f"were moved to {os.path.dirname(moved[0])} (move one back to retry it; "
                      "running again starts the run from step 0)")
    raise UserError(f"{self.directory} holds no checkpoint to restore")

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, Any, int]:
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    state, data_state = restored["state"], restored["data"]
    # Orbax hands back whatever JSON the data item held; the loader needs its own mapping.
    if state is None or not isinstance(data_state, Mapping):
      raise ValueError(f"the data item holds {type(data_state).__name__}, not the loader's "
                       "state")
    return state, dict(data_state), step

  def _set_aside(self, step: int) -> str:
    """Moves a step folder out of orbax's sight (never deleting it) and reloads the manager,
    which caches the steps it found when it was made."""
    target = _free_name(os.path.join(run_layout.corrupt_checkpoints_dir(self.workdir),
                                     str(step)))
    if jax.process_index() == 0:  # one host moves it; the others wait for the move
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(self._step_dir(step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"adjax set aside checkpoint {step}")
    self.manager.reload()
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _free_name(path: str) -> str:
  """`path`, or `path-2`, `path-3`, ... when taken (the same step may be damaged twice)."""
  candidate, n = path, 1
  while os.path.exists(candidate):
    n += 1
    candidate = f"{path}-{n}"
  return candidate


def _reason(err: BaseException) -> str:
  """One short line: tensorstore's messages run to pages of JSON spec."""
  text = files.one_line(err) or repr(err)
  text = text.split(" See full TensorStore details")[0]  # the rest is the store's whole spec
  return f"{type(err).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"


def _is_orbax_leftover(unraisable: Any) -> bool:
  """Whether an unraisable exception is the echo of a failed orbax read: when one array of a
  step cannot be read, orbax closes its event loop with the other reads still in flight, and
  each of them later reports, through sys.unraisablehook, a closed loop or its own read error
  (hundreds of tracebacks after the one-line warning that already said what happened)."""
  err = getattr(unraisable, "exc_value", None)
  text = str(err)[:200]
  return (isinstance(err, RuntimeError) and text == "Event loop is closed") or (
      type(err) is Exception and text.startswith("Encountered error while reading array"))


def _quiet_orbax_leftovers() -> None:
  """Installs, once, a sys.unraisablehook that drops `_is_orbax_leftover` reports and passes
  every other one on to the hook it replaces."""
  if getattr(sys.unraisablehook, "_adjax_filter", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable: Any) -> None:
    if not _is_orbax_leftover(unraisable):
      previous(unraisable)

  hook._adjax_filter = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def _reraise_if_machine_error(err: BaseException) -> None:
  """Out of memory is the machine's problem, not the checkpoint's: it must not send intact
  checkpoints aside."""
  if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err)[:2000]:
    raise err


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `tree`, for restoring into it."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def read_run_params(workdir: str, which: str = "angle") -> tuple[Params, dict[str, Any]]:
  """The projector params of a run and their metadata.

  Args:
    workdir: the run's workdir.
    which: "angle" / "norm" (best/<which>/params.npz, the checkpoints selected by PatchCore
      and FeatureNorm) or "latest" (the newest orbax checkpoint under checkpoints/).

  Returns:
    (params tree of numpy arrays, meta dict with at least "step" and "metrics").

  Raises:
    UserError: no such run, or it has no params of that kind.
  """
  if which not in WHICH:
    raise UserError(f"--which must be one of {', '.join(WHICH)}, got {which!r}")
  if not os.path.isdir(workdir):
    raise UserError(f"run workdir not found: {workdir}")
  if which == "latest":
    return _read_latest_checkpoint(workdir)
  path = run_layout.best_params_path(workdir, which)
  if not os.path.isfile(path):
    have = [k for k in run_layout.KINDS if os.path.isfile(run_layout.best_params_path(workdir, k))]
    hint = f"; it has {', '.join(have)}" if have else "; it has no selected checkpoint yet"
    if os.path.isdir(run_layout.checkpoints_dir(workdir)):
      hint += " (use --which latest for the newest training checkpoint)"
    raise UserError(f"{workdir} has no {which} params ({path} is missing){hint}")
  params, meta = run_layout.load_best(workdir, which)
  meta = {"step": meta.get("step"), "metrics": meta.get("metrics", {}),
          **{k: v for k, v in meta.items() if k not in ("step", "metrics")}}
  return params, meta


def _read_latest_checkpoint(workdir: str) -> tuple[Params, dict[str, Any]]:
  """Reads `state["params"]` of the newest step of the run's orbax CheckpointManager that can
  be read; a newer one that cannot is named in a warning and left where it is (export and
  evaluation only read a run: setting damaged steps aside is the resume's business)."""
  ckpt_dir = os.path.abspath(run_layout.checkpoints_dir(workdir))
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"{workdir} has no checkpoints/ folder; export --which angle or norm")
  _quiet_orbax_leftovers()
  manager = ocp.CheckpointManager(ckpt_dir)
  damaged: list[tuple[str, str]] = []
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise UserError(f"{ckpt_dir} holds no finished checkpoint")
    for step in steps:
      try:
        params = _step_params(manager, step)
      except Exception as err:  # orbax and tensorstore raise many types, some plain Exception
        _reraise_if_machine_error(err)
        damaged.append((os.path.join(ckpt_dir, str(step)), _reason(err)))
        continue
      if damaged:
        log.warning("checkpoint %s cannot be read (%s); using step %d instead", *damaged[0],
                    step)
      return params, {"step": int(step), "metrics": {}}
  finally:
    manager.close()
  raise UserError(f"no checkpoint in {ckpt_dir} can be read; the newest, {damaged[0][0]}: "
                  f"{damaged[0][1]}")


def _step_params(manager: ocp.CheckpointManager, step: int) -> Params:
  """The projector params of one step, as numpy arrays."""
  restored = None
  errors: list[BaseException] = []
  # The trainer saves Composite(state=StandardSave({"params": ..., ...})); try the matching
  # restore first, then the other handlers orbax may have recorded.
  for args in (ocp.args.Composite(state=ocp.args.StandardRestore()),
               ocp.args.Composite(state=ocp.args.PyTreeRestore()), None):
    try:
      restored = manager.restore(step, args=args) if args is not None else manager.restore(step)
      break
    except Exception as err:  # a damaged step fails every handler; the first error says why
      _reraise_if_machine_error(err)
      errors.append(err)
      # Only a handler that does not fit is worth another try; unreadable data is the step's.
      if not isinstance(err, (KeyError, TypeError, ValueError)) or "DATA_LOSS" in str(err):
        break
  if restored is None:
    raise errors[0]
  state = restored["state"] if "state" in restored else restored
  if not isinstance(state, Mapping) or "params" not in state:
    raise ValueError("no 'params' in its 'state' item")
  return _to_numpy_tree(state["params"])


def _to_numpy_tree(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _to_numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree, dtype=np.float32)


def final_params(workdir: str) -> Params:
  """The projector parameters of a run's newest checkpoint (numpy)."""
  return read_run_params(workdir, "latest")[0]
