"""A downstream method on a dataset, on original and on pretrained features (docs/method.md section
6).

Arguments (comma-separated): `method=patchcore|padim|featurenorm|cflow|uniad|glass` (default
patchcore), `dataset=mvtec|visa|btad|mpdd|mvtec3d` (default mvtec), `backbone=` one of the
paper's five (default dinov2-base; it must be the pretraining run's), `checkpoint=angle|norm`
(default: the paper's choice, angle for PatchCore and PaDiM, norm for the others), `runlocal`
(EfficientNet-Lite0 on the embedded dataset's evaluation classes, whatever `dataset` says),
`data=DIR` (the embedded dataset's folder for runlocal).

Every method runs on both feature kinds ("original": the backbone's; "pretrained":
projector(residual(features))) with 8 reference shots per class, so one run compares them.
To reproduce the paper's CFLOW and GLASS tables, which report each metric's best over test-set
checks during training, add `--config.eval.best_over_test=true`; for GLASS's texture anomalies
as the reference makes them, `--config.eval.method_settings.glass.textures=/data/dtd/images
--config.eval.method_settings.glass.texture_refresh=true` (new textures every epoch, as
there; and on MVTec AD and VisA, where the reference keeps them on the object,
`--config.eval.method_settings.glass.foreground=GLASS/fg_mask`).

On a pretraining run (or on a released checkpoint imported with `adjax import`):

  adjax evaluate --config experiments/downstream.py:method=padim,dataset=visa \
      --workdir runs/pretrain-dinov2-base --out runs/pretrain-dinov2-base/eval/padim-visa \
      --config.eval.root=/data/VisA --config.backbone.weights=/weights/dinov2_vitb14_pretrain.pth

  adjax import checkpoints_pro_angle.pth --backbone dinov2-base --out runs/released
  adjax evaluate --config experiments/downstream.py:method=patchcore,dataset=mvtec \
      --workdir runs/released --config.eval.root=/data/mvtec_ad \
      --config.backbone.weights=/weights/dinov2_vitb14_pretrain.pth

Here, in minutes (after `adjax pretrain --config experiments/pretrain.py:runlocal --workdir
runs/local`):

  adjax evaluate --config experiments/downstream.py:method=featurenorm,runlocal \
      --workdir runs/local
"""

from __future__ import annotations

import ml_collections

from adjax.configs import shared
from adjax.configs.loading import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The evaluation config; see the module docstring for the arguments."""
  args = parse_arg(arg, method="patchcore", dataset="mvtec", backbone="dinov2-base",
                   checkpoint="", runlocal=False, data="")
  method, dataset = args["method"], args["dataset"]
  if method not in shared.METHOD_CHECKPOINT:
    raise ValueError(f"unknown method {method!r}; choose one of "
                     f"{', '.join(shared.METHOD_CHECKPOINT)}")
  if dataset not in shared.DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(shared.DATASETS)}")
  checkpoint = args["checkpoint"] or shared.METHOD_CHECKPOINT[method]
  if checkpoint not in ("angle", "norm"):
    raise ValueError(f"checkpoint must be angle or norm, got {checkpoint!r}")

  c = shared.base_config(args["backbone"])
  c.eval.format = dataset            # mvtec3d: its RGB images only
  c.eval.root = ""                   # the user's dataset folder
  c.eval.classes = ""                # every class found
  c.eval.methods = (method,)
  c.eval.features = ("original", "pretrained")
  c.eval.shots = 8                   # reference images per class for the residuals
  c.eval.k_shot = 0                  # the full normal training set
  c.eval.checkpoint = checkpoint
  if args["runlocal"]:
    shared.apply_runlocal(c, args["data"] or None)   # the embedded set, at its own size
  elif method in ("patchcore", "padim") and dataset == "mvtec":
    # The reference evaluates PatchCore and PaDiM on MVTec AD at Resize(256) + CenterCrop(224).
    c.eval.resize = round(c.image_size * 256 / 224)
  elif method == "glass" and dataset == "mvtec":
    # GLASS's MVTec AD loader zooms two classes: Resize(round(crop * 329 / 288)), then the crop
    # (the reference runs it with 224 / 224 for the rest).
    c.eval.class_resize = {name: round(c.image_size * 329 / 288) for name in ("toothbrush", "wood")}
  return c
