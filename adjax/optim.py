"""The optimiser of the recipe (docs/method.md section 5): Adam with coupled L2 weight decay.

torch.optim.Adam's `weight_decay` adds wd * param to the gradient *before* the moments (not
AdamW's decoupled decay), so the chain is add_decayed_weights -> scale_by_adam -> learning rate.
The learning rate steps down by `decay_factor` after each epoch in `decay_epochs`.
"""

from __future__ import annotations

from typing import Sequence

import optax


def learning_rate_schedule(lr: float, steps_per_epoch: int, decay_epochs: Sequence[int],
                           decay_factor: float) -> optax.Schedule:
  """Piecewise-constant lr: x decay_factor after each epoch boundary in decay_epochs."""
  boundaries = {int(epoch * steps_per_epoch): decay_factor for epoch in decay_epochs}
  return optax.piecewise_constant_schedule(lr, boundaries)


def make_optimizer(lr: float, weight_decay: float, steps_per_epoch: int,
                   decay_epochs: Sequence[int] = (7, 9),
                   decay_factor: float = 0.1) -> optax.GradientTransformation:
  """Adam with torch-style coupled L2 decay and the step-down schedule.

  Args:
    lr: base learning rate (1e-4 in the paper).
    weight_decay: L2 coefficient added to the gradient (5e-4).
    steps_per_epoch: optimiser steps in one epoch (sets the schedule's boundaries).
    decay_epochs: epochs after which the lr is multiplied by decay_factor.
    decay_factor: 0.1 in the paper.
  """
  schedule = learning_rate_schedule(lr, steps_per_epoch, decay_epochs, decay_factor)
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      optax.scale_by_learning_rate(schedule),
  )
