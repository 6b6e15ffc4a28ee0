"""The demo's config: `adjax demo` on the embedded dataset (adjax/demo.py runs it)."""

from __future__ import annotations

import ml_collections

from adjax.configs.default import default_config


def demo_config() -> ml_collections.ConfigDict:
  """The embedded default: EfficientNet-Lite0 (stride 8 and 16 taps), 160 px, batch 8."""
  c = default_config()
  c.backbone.name = "efficientnet-lite0"
  c.backbone.taps = (5, 11)          # blocks ending at stride 8 (40 ch) and 16 (112 ch)
  c.image_size = 160
  c.data.batch_size = 8
  c.data.shots = (1, 2, 4)
  c.data.max_shots = 4
  c.data.anomaly_share = 0.5
  c.projector.num_heads = 8          # divides 40 and 112
  c.projector.num_ref_tokens = 512
  c.optim.lr = 1e-4
  c.optim.max_steps = 300
  c.train.dtype = "float32"          # the README's figures; bfloat16 is faster only on AMX CPUs
  c.train.log_every = 5
  c.train.checkpoint_every = 100
  c.train.eval_every_epochs = 0      # no validation split in the embedded set: final params
  c.train.center_images_per_group = 8
  c.eval.methods = ("featurenorm", "patchcore", "padim")
  c.eval.features = ("original", "residual", "pretrained")
  c.eval.shots = 8
  c.demo = ml_collections.ConfigDict()
  c.demo.data_dir = "data/embedded"
  c.demo.workdir = "runs/demo"
  c.demo.pretrain_classes = 6
  c.demo.eval_classes = 4
  c.demo.images_per_class = 48
  c.demo.views = 2
  c.demo.fresh = True                # start the pretraining from scratch (False: resume)
  return c
