"""OpenAI CLIP vision towers (ViT-B/16, ViT-L/14): config, mapping tables, registry entries.

Weights: the OpenAI ``ViT-B-16.pt`` / ``ViT-L-14.pt`` TorchScript archives (read by
``adjax.io.torch_pickle`` without torch; fp16 weights become float32), an OpenAI-layout
state dict (keys ``visual.transformer.resblocks.N.attn.in_proj_weight`` ...), or a Hugging Face
``CLIPModel`` / ``CLIPVisionModel`` safetensors file (keys ``[vision_model.]encoder.layers.N.
self_attn.q_proj.weight`` ...). QuickGELU, ``ln_pre``, LayerNorm eps 1e-5, no patch bias, a
fixed position table (the input must be 224 px).
"""
from __future__ import annotations

from typing import Any, Mapping

from adjax.io import mapping
from adjax.models.backbones import base
from adjax.models.backbones import vit

CONFIGS: dict[str, dict[str, Any]] = {
    "clip-base": dict(width=768, depth=12, heads=12, patch=16, taps=(3, 6, 9, 12)),
    "clip-large": dict(width=1024, depth=24, heads=16, patch=14, taps=(6, 12, 18, 24)),
}


def _flat(a):
  return mapping.to_float32(a).reshape(-1)


def _table(a):
  return mapping.to_float32(a).reshape(-1, a.shape[-1])


def _official_rules(n_blocks: int) -> list[mapping.Rule]:
  R = mapping.Rule
  p = "visual."
  rules = [
      R("patch_embed/kernel", p + "conv1.weight", mapping.conv2d),
      R("cls_token", p + "class_embedding", _flat),
      R("pos_embed", p + "positional_embedding", _table),
      R("ln_pre/scale", p + "ln_pre.weight"),
      R("ln_pre/bias", p + "ln_pre.bias"),
  ]
  names = dict(norm1="ln_1", norm2="ln_2", qkv="attn.in_proj_", proj="attn.out_proj",
               fc1="mlp.c_fc", fc2="mlp.c_proj")
  for i in range(n_blocks):
    rules += vit.block_rules(i, f"{p}transformer.resblocks.{i}.", names, fused_qkv=True,
                             layer_scale=False)
  return rules


def _hf_rules(n_blocks: int) -> list[mapping.Rule]:
  """Hugging Face names with the ``vision_model.`` prefix already removed."""
  R = mapping.Rule
  rules = [
      R("patch_embed/kernel", "embeddings.patch_embedding.weight", mapping.conv2d),
      R("cls_token", "embeddings.class_embedding", _flat),
      R("pos_embed", "embeddings.position_embedding.weight", _table),
      R("ln_pre/scale", "pre_layrnorm.weight"),
      R("ln_pre/bias", "pre_layrnorm.bias"),
  ]
  names = dict(norm1="layer_norm1", norm2="layer_norm2", q="self_attn.q_proj",
               k="self_attn.k_proj", v="self_attn.v_proj", proj="self_attn.out_proj",
               fc1="mlp.fc1", fc2="mlp.fc2")
  for i in range(n_blocks):
    rules += vit.block_rules(i, f"encoder.layers.{i}.", names, fused_qkv=False,
                             layer_scale=False)
  return rules


def convert(state: Mapping[str, Any], template: Mapping[str, Any], source: str, *,
            n_blocks: int, name: str = "clip") -> dict:
  """OpenAI or Hugging Face CLIP state dict -> params of the vision ``vit.ViT``.

  Everything outside the vision tower (text tower, projections, logit scale) and the vision
  tower's ``ln_post`` / ``proj`` are ignored.

  Args:
    state: flat state dict (a TorchScript archive already flattened).
    template: params shapes of the module.
    source: file name for messages.
    n_blocks: blocks built by the module.
    name: backbone name for messages.

  Returns:
    params tree.
  """
  state = mapping.strip_prefix(state, ("module.",))
  if any(k.startswith("vision_model.") for k in state):
    # A CLIPModel file: keep the vision tower (text tower, projections, logit scale dropped).
    n = len("vision_model.")
    state = {k[n:]: v for k, v in state.items() if k.startswith("vision_model.")}
  if "embeddings.class_embedding" in state:  # Hugging Face names
    rules = _hf_rules(n_blocks)
    ignore = [r"post_layernorm\..*", r"embeddings\.position_ids",
              mapping.index_at_least(r"encoder\.layers\.", n_blocks)]
  else:
    rules = _official_rules(n_blocks)
    ignore = [lambda k: not k.startswith("visual."), r"visual\.ln_post\..*", r"visual\.proj",
              mapping.index_at_least(r"visual\.transformer\.resblocks\.", n_blocks)]
  return mapping.apply_rules(state, rules, template, ignore=ignore, source=source, model=name)


def make(name: str, **overrides: Any) -> base.Backbone:
  """Build a CLIP vision backbone.

  Args:
    name: 'clip-base' or 'clip-large'.
    **overrides: any of width, depth, heads, mlp_dim, patch, taps, input_size, eps, mean, std.

  Returns:
    The backbone (fixed input size: the position table is not resampled).
  """
  cfg = dict(input_size=224, eps=1e-5, mean=base.CLIP_MEAN, std=base.CLIP_STD)
  cfg.update(CONFIGS[name])
  base.check_overrides(name, overrides, list(cfg) + ["mlp_dim"])
  cfg.update(overrides)
  cfg.setdefault("mlp_dim", 4 * cfg["width"])
  return vit.fixed_size_backbone(name, cfg, "quick_gelu", convert)
