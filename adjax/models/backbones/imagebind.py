"""ImageBind's vision tower (ViT-H/14, 32 blocks): config, mapping table, registry entry.

Weights: the official ``imagebind_huge.pth`` (all six modalities; only the vision keys are
used). ImageBind repeats an image into two identical frames and embeds them with a Conv3d of
kernel (2, 14, 14) and stride (2, 14, 14); on two equal frames that is a Conv2d whose kernel is
the sum of the two temporal slices, which the mapping table computes once. Pre-norm blocks with
LayerNorm eps 1e-6, exact GELU, ``ln_pre``, no LayerScale, CLIP normalisation, a fixed
16 x 16 position table (224 px).
"""
from __future__ import annotations

from typing import Any, Mapping

from adjax.io import mapping
from adjax.models.backbones import base
from adjax.models.backbones import vit

CONFIGS: dict[str, dict[str, Any]] = {
    "imagebind": dict(width=1280, depth=32, heads=16, taps=(8, 16, 24, 32)),
}

_PRE = "modality_preprocessors.vision."
_TRUNK = "modality_trunks.vision."


def _rules(n_blocks: int) -> list[mapping.Rule]:
  R = mapping.Rule
  rules = [
      R("patch_embed/kernel", _PRE + "rgbt_stem.proj.1.weight", mapping.sum_temporal_conv3d),
      R("cls_token", _PRE + "cls_token", lambda a: mapping.to_float32(a).reshape(-1)),
      R("pos_embed", _PRE + "pos_embedding_helper.pos_embed",
        lambda a: mapping.to_float32(a).reshape(-1, a.shape[-1])),
      R("ln_pre/scale", _TRUNK + "pre_transformer_layer.0.weight"),
      R("ln_pre/bias", _TRUNK + "pre_transformer_layer.0.bias"),
  ]
  names = dict(norm1="norm_1", norm2="norm_2", qkv="attn.in_proj_", proj="attn.out_proj",
               fc1="mlp.fc1", fc2="mlp.fc2")
  for i in range(n_blocks):
    rules += vit.block_rules(i, f"{_TRUNK}blocks.{i}.", names, fused_qkv=True,
                             layer_scale=False)
  return rules


def convert(state: Mapping[str, Any], template: Mapping[str, Any], source: str, *,
            n_blocks: int, name: str = "imagebind") -> dict:
  """ImageBind state dict -> params of the vision ``vit.ViT`` (other modalities ignored).

  Args:
    state: flat state dict.
    template: params shapes of the module.
    source: file name for messages.
    n_blocks: blocks built by the module.
    name: backbone name for messages.

  Returns:
    params tree.
  """
  state = mapping.strip_prefix(state, ("module.",))
  ignore = [lambda k: not (k.startswith(_PRE) or k.startswith(_TRUNK)),
            mapping.index_at_least(r"modality_trunks\.vision\.blocks\.", n_blocks)]
  return mapping.apply_rules(state, _rules(n_blocks), template, ignore=ignore, source=source,
                             model=name)


def make(name: str, **overrides: Any) -> base.Backbone:
  """Build the ImageBind vision backbone.

  Args:
    name: 'imagebind'.
    **overrides: any of width, depth, heads, mlp_dim, patch, taps, input_size, eps, mean, std.

  Returns:
    The backbone (fixed input size).
  """
  cfg = dict(patch=14, input_size=224, eps=1e-6, mean=base.CLIP_MEAN, std=base.CLIP_STD)
  cfg.update(CONFIGS[name])
  base.check_overrides(name, overrides, list(cfg) + ["mlp_dim"])
  cfg.update(overrides)
  cfg.setdefault("mlp_dim", 4 * cfg["width"])
  return vit.fixed_size_backbone(name, cfg, "gelu", convert)
