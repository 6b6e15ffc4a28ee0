"""Ablations of the pretraining recipe: sweeps of overrides on `experiments/pretrain.py`.

`get_config(arg)` is the pretraining config (same arguments: `backbone=...`, `runlocal`,
`data=DIR`); each `*_sweep()` function lists `(point name, overrides)`. Every point pretrains
in its own folder `<sweep dir>/<point>` and is then evaluated (the sweep's default job:
`adjax.train.pretrain`, then `adjax.evaluate.evaluate` into `<point>/eval`).

Run a sweep here, one point after another (a rerun skips finished points and retries failed
ones), then gather one table and one plot:

  adjax sweep experiments/ablations.py:loss_sweep --config :runlocal --workdir sweeps/loss
  adjax collect sweeps/loss

The paper's setting on a cluster: one command per point, for the scheduler to launch:

  adjax sweep experiments/ablations.py:loss_sweep --config :backbone=dinov2-base \
      --workdir /runs/sweeps/loss --emit /runs/sweeps/loss/commands.txt \
      --config.backbone.weights=/weights/dinov2_vitb14_pretrain.pth \
      --config.data.pretrain_root=/data/Real-IAD --config.data.val_root=/data/mvtec_ad \
      --config.eval.root=/data/mvtec_ad

Sweeps: loss_sweep, center_sweep, residual_sweep, depth_sweep, ref_tokens_sweep,
temperature_sweep, shots_sweep, augment_sweep, and all_sweep (every point of all of them).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from adjax.configs.shared import pretrain_config

Sweep = list[tuple[str, dict[str, Any]]]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The base config of every point: `experiments/pretrain.py`'s."""
  return pretrain_config(arg)


def loss_sweep() -> Sweep:
  """Angle loss only, norm loss only, both (the paper's)."""
  return [
      ("loss-angle", {"loss.angle": True, "loss.norm": False}),
      ("loss-norm", {"loss.angle": False, "loss.norm": True}),
      ("loss-both", {"loss.angle": True, "loss.norm": True}),
  ]


def center_sweep() -> Sweep:
  """The per-level centre subtracted in the angle loss, or not."""
  return [("center-on", {"loss.center": True}), ("center-off", {"loss.center": False})]


def residual_sweep() -> Sweep:
  """Residual features into the projector (the paper's), or the raw backbone features."""
  return [("residual-on", {"loss.residual": True}), ("residual-off", {"loss.residual": False})]


def depth_sweep() -> Sweep:
  """Projector layers per level."""
  return [(f"depth-{d}", {"projector.depth": d}) for d in (1, 2)]


def ref_tokens_sweep() -> Sweep:
  """Learnable reference tokens per level."""
  return [(f"ref-tokens-{n}", {"projector.num_ref_tokens": n}) for n in (512, 2048)]


def temperature_sweep() -> Sweep:
  """Temperature tau of the angle loss (0.15 in the paper)."""
  return [(f"temperature-{t:g}", {"loss.temperature": t}) for t in (0.05, 0.1, 0.15, 0.3, 0.5)]


def shots_sweep() -> Sweep:
  """Shot policy: a fixed n_shot per batch, or drawn from {1, 4, 8} (the paper's)."""
  policies = ((1,), (4,), (8,), (1, 4, 8))
  return [("shots-" + "-".join(map(str, s)), {"data.shots": s, "data.max_shots": max(s)})
          for s in policies]


def augment_sweep() -> Sweep:
  """Colour augmentation of the two views on, or off (two identical views)."""
  return [("augment-on", {"data.augment": True}), ("augment-off", {"data.augment": False})]


def all_sweep() -> Sweep:
  """Every point of every sweep above (names are unique across them)."""
  points: Sweep = []
  for sweep in (loss_sweep, center_sweep, residual_sweep, depth_sweep, ref_tokens_sweep,
                temperature_sweep, shots_sweep, augment_sweep):
    points += sweep()
  return points
