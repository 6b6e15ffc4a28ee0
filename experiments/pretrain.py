"""Pretraining the projector on RealIAD with one of the paper's five backbones (docs/method.md
sections 1 and 5).

Arguments (comma-separated): `backbone=dinov2-base|dinov2-large|clip-base|clip-large|imagebind`
(default dinov2-base), `runlocal` (EfficientNet-Lite0 on the embedded dataset, 128 px, batch 8,
20 steps: minutes on a laptop CPU), `data=DIR` (the embedded dataset's folder for runlocal).

The paper's run, per backbone (the weights file is the official one the user has):

  adjax pretrain --config experiments/pretrain.py:backbone=dinov2-large \
      --workdir runs/pretrain-dinov2-large \
      --config.backbone.weights=/weights/dinov2_vitl14_pretrain.pth \
      --config.data.pretrain_root=/data/Real-IAD --config.data.val_root=/data/mvtec_ad

Packed shards read faster: `adjax data pack --format realiad --root /data/Real-IAD --out
/data/tfds`, then add `--config.data.pretrain_tfds_dir=<the printed builder dir>`.

Here, in minutes:

  adjax data embedded --out data/embedded --image-size 128
  adjax pretrain --config experiments/pretrain.py:runlocal --workdir runs/local
  adjax export --workdir runs/local --out runs/local/projector_angle.pth
"""

from __future__ import annotations

import ml_collections

from adjax.configs.shared import pretrain_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The pretraining config; see the module docstring for the arguments."""
  return pretrain_config(arg)
