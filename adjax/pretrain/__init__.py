"""Pretraining the projector (docs/method.md section 5).

  setup.py    records, loader and step settings from a config
  derived.py  centres and the reference bank, computed once per run
  step.py     the compiled train step (pure: losses, gradients, update)
  loop.py     `pretrain`: the loop, checkpoints, preemption, metrics, best-checkpoint tracking
"""

from adjax.pretrain.derived import compute_centers, precompute_references, reference_bank
from adjax.pretrain.loop import pretrain
from adjax.pretrain.setup import make_loader, pretrain_records, step_settings

__all__ = ["compute_centers", "make_loader", "precompute_references", "pretrain",
           "pretrain_records", "reference_bank", "step_settings"]
