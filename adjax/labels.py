"""Token labels from pixel masks, for the two pretraining losses (docs/method.md section 4).

The angle loss calls a token anomalous when more than `threshold` of the pixels of its
`patch_size` x `patch_size` patch are set; the norm loss takes the mask pixel at the patch's
top-left corner, which is what PyTorch's `interpolate(mode='nearest')` samples when the mask
side is a multiple of the grid side.

The same code runs on numpy arrays (in data-loading workers, where starting jax is wasteful) and
on jax arrays (inside a jitted step): `xp` is the array module.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def _token_labels(xp: ModuleType, masks: Any, patch_size: int, threshold: int):
  if masks.ndim != 3:
    raise ValueError(f"masks must be (B, H, W), got shape {tuple(masks.shape)}")
  b, h, w = masks.shape
  if h % patch_size or w % patch_size:
    raise ValueError(
        f"mask size {h} x {w} is not a multiple of patch_size={patch_size}")
  gh, gw = h // patch_size, w // patch_size
  binary = (masks > 0).astype(xp.float32)
  patches = binary.reshape(b, gh, patch_size, gw, patch_size)
  counts = patches.sum(axis=(2, 4))
  angle_labels = (counts > threshold).astype(xp.float32)
  norm_labels = binary[:, ::patch_size, ::patch_size]
  return angle_labels, norm_labels


def token_labels(masks, patch_size: int = 14, threshold: int = 32):
  """Labels of the token grid from binary pixel masks.

  Args:
    masks: (B, H, W) in {0, 1} (any non-zero counts as anomalous); H and W multiples of
      `patch_size`.
    patch_size: pixels per token side (14 for the ViT backbones at 224).
    threshold: a token is anomalous for the angle loss when more than this many of its
      patch_size**2 pixels are set (32 of 196 in the reference).

  Returns:
    (angle_labels, norm_labels), both float32 (B, H / patch_size, W / patch_size). numpy in,
    numpy out; jax in, jax out.
  """
  if isinstance(masks, np.ndarray):
    return _token_labels(np, masks, patch_size, threshold)
  import jax.numpy as jnp
  return _token_labels(jnp, jnp.asarray(masks), patch_size, threshold)
