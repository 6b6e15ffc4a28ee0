"""Orbax checkpoints of a pretraining run: train state and data-iterator state together.

`<workdir>/checkpoints/<step>/` holds two items: "state" (projector params, optimiser state,
step, skipped count, rng) and "data" (JSON: the grain iterator's state and the loader's worker
count, `PretrainLoader.state`). Saves are
asynchronous; orbax writes each step to a temporary folder and renames it when complete, so a
run killed at any moment resumes from its last complete step. The latest N are kept.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from adjax import run_layout
from adjax.errors import UserError

Params = dict[str, Any]
# The projector parameters a run offers: the two selected checkpoints and the newest one.
WHICH = ("angle", "norm", "latest")


class RunCheckpointer:
  """Saves and restores (state, data_state) under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    # Orbax refuses relative paths (late, when an asynchronous save finalises).
    directory = os.path.abspath(run_layout.checkpoints_dir(workdir))
    self.manager = ocp.CheckpointManager(directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Any, *, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, Any, int]:
    """(state placed as abstract_state's shardings, data_state, step) of `step` or the latest."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError("no checkpoint to restore")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
  """Reads `state["params"]` of the newest step of the run's orbax CheckpointManager."""
  ckpt_dir = os.path.abspath(run_layout.checkpoints_dir(workdir))
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"{workdir} has no checkpoints/ folder; export --which angle or norm")
  manager = ocp.CheckpointManager(ckpt_dir)
  try:
    step = manager.latest_step()
    if step is None:
      raise UserError(f"{ckpt_dir} holds no finished checkpoint")
    restored = None
    errors = []
    # The trainer saves Composite(state=StandardSave({"params": ..., ...})); try the matching
    # restore first, then the other handlers orbax may have recorded.
    for args in (ocp.args.Composite(state=ocp.args.StandardRestore()),
                 ocp.args.Composite(state=ocp.args.PyTreeRestore()), None):
      try:
        restored = manager.restore(step, args=args) if args is not None else manager.restore(step)
        break
      except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
        errors.append(f"{type(err).__name__}: {err}")
  finally:
    manager.close()
  if restored is None:
    raise UserError(f"cannot read checkpoint step {step} in {ckpt_dir}: {errors[-1][:300]}")
  state = restored["state"] if "state" in restored else restored
  if not isinstance(state, Mapping) or "params" not in state:
    raise UserError(f"checkpoint step {step} in {ckpt_dir} has no 'params' in its 'state' item")
  params = _to_numpy_tree(state["params"])
  return params, {"step": int(step), "metrics": {}}


def _to_numpy_tree(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _to_numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree, dtype=np.float32)


def final_params(workdir: str) -> Params:
  """The projector parameters of a run's newest checkpoint (numpy)."""
  return read_run_params(workdir, "latest")[0]
