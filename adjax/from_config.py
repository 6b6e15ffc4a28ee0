"""What a run config builds, shared by pretraining and evaluation: the frozen backbone with its
weights, the compute dtype, and the class lists of comma-separated settings."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from adjax import run_layout

_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  if config.train.dtype not in _COMPUTE_DTYPES:
    raise ValueError(f"config.train.dtype must be one of {sorted(_COMPUTE_DTYPES)}, got "
                     f"{config.train.dtype!r}")
  return _COMPUTE_DTYPES[config.train.dtype]


def build_backbone(config: ml_collections.ConfigDict, workdir: Optional[str] = None):
  """(backbone, params) from config.backbone: the user's weights file, the packaged
  EfficientNet-Lite0 weights, or random weights for the test backbone `tiny-vit`."""
  from adjax.models.backbones import get_backbone
  overrides = {}
  if config.backbone.get("taps"):
    overrides["taps"] = tuple(config.backbone.taps)
  backbone = get_backbone(config.backbone.name, **overrides)
  weights = config.backbone.weights
  cache_dir = config.backbone.cache_dir or None
  if weights:
    params = backbone.load(weights, cache_dir=cache_dir)
  elif config.backbone.name == "efficientnet-lite0":
    from adjax.models.backbones.efficientnet import default_weights_path
    params = backbone.load(default_weights_path(), cache_dir=cache_dir)
  elif config.backbone.name == "tiny-vit":
    params = backbone.init(jax.random.PRNGKey(config.seed))
  else:
    raise ValueError(f"backbone {config.backbone.name!r} needs its weights: pass "
                     "--config.backbone.weights=FILE (.pth, .pt or .safetensors)")
  return backbone, params


def split_classes(value: str) -> Optional[list[str]]:
  """A comma-separated class list from the config; None (every class) when empty."""
  return run_layout.comma_list(value) or None
