"""Orbax checkpoints of a pretraining run: train state and data-iterator state together.

`<workdir>/checkpoints/<step>/` holds two items: "state" (projector params, optimiser state,
step, skipped count, rng) and "data" (JSON: the grain iterator's state and the loader's worker
count, `PretrainLoader.state`). Saves are
asynchronous; orbax writes each step to a temporary folder and renames it when complete, so a
run killed at any moment resumes from its last complete step. The latest N are kept.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from adjax import run_layout


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
