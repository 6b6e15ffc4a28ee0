"""DINOv2 ViT backbones (no registers): config, mapping tables, registry entries.

Weights: the official ``dinov2_vit{b,l}14_pretrain.pth`` (keys ``blocks.N.attn.qkv.weight`` ...)
or a Hugging Face ``Dinov2Model`` safetensors file (keys ``encoder.layer.N.attention.attention.
query.weight`` ... as on the hub, or ``encoder.layer.N.attention.q_proj.weight`` ... as
transformers >= 5 saves them; optionally under a ``dinov2.`` prefix). A DINOv2 teacher
checkpoint (``backbone.*`` beside ``dino_head.*`` / ``ibot_head.*``) and a Hugging Face
``Dinov2ForImageClassification`` file (``dinov2.*`` beside ``classifier.*``) load too, their
heads ignored. The 37 x 37 position
table (trained at 518 px) is resampled for the input grid as the official code does (docs/method.md
section 1).
"""
from __future__ import annotations

from typing import Any, Mapping

from adjax.io import mapping
from adjax.models.backbones import base
from adjax.models.backbones import vit

# name -> width, depth, heads, taps. Taps: docs/method.md section 1 (1-based, before the final
# norm).
CONFIGS: dict[str, dict[str, Any]] = {
    "dinov2-base": dict(width=768, depth=12, heads=12, taps=(3, 6, 9, 12)),
    "dinov2-large": dict(width=1024, depth=24, heads=16, taps=(6, 12, 18, 24)),
    # Tiny random-weight DINOv2-style model for tests: 16 x 16 tokens at 224 px, in milliseconds.
    "tiny-vit": dict(width=64, depth=4, heads=4, taps=(1, 2, 3, 4), pos_grid=16),
}


def _official_rules(n_blocks: int, layer_scale: bool) -> list[mapping.Rule]:
  R = mapping.Rule
  rules = [
      R("patch_embed/kernel", "patch_embed.proj.weight", mapping.conv2d),
      R("patch_embed/bias", "patch_embed.proj.bias"),
      R("cls_token", "cls_token", lambda a: mapping.to_float32(a).reshape(-1)),
      R("pos_embed", "pos_embed", lambda a: mapping.to_float32(a).reshape(a.shape[-2], -1)),
  ]
  names = dict(norm1="norm1", norm2="norm2", qkv="attn.qkv", proj="attn.proj", fc1="mlp.fc1",
               fc2="mlp.fc2", ls1="ls1.gamma", ls2="ls2.gamma")
  for i in range(n_blocks):
    rules += vit.block_rules(i, f"blocks.{i}.", names, fused_qkv=True, layer_scale=layer_scale)
  return rules


# Hugging Face attention names: hub files (transformers < 5) and transformers >= 5 saves.
_HF_ATTN_OLD = dict(q="attention.attention.query", k="attention.attention.key",
                    v="attention.attention.value", proj="attention.output.dense")
_HF_ATTN_NEW = dict(q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                    proj="attention.o_proj")


def _hf_rules(n_blocks: int, layer_scale: bool, attn: dict[str, str]) -> list[mapping.Rule]:
  R = mapping.Rule
  rules = [
      R("patch_embed/kernel", "embeddings.patch_embeddings.projection.weight", mapping.conv2d),
      R("patch_embed/bias", "embeddings.patch_embeddings.projection.bias"),
      R("cls_token", "embeddings.cls_token", lambda a: mapping.to_float32(a).reshape(-1)),
      R("pos_embed", "embeddings.position_embeddings",
        lambda a: mapping.to_float32(a).reshape(a.shape[-2], -1)),
  ]
  names = dict(norm1="norm1", norm2="norm2", fc1="mlp.fc1", fc2="mlp.fc2",
               ls1="layer_scale1.lambda1", ls2="layer_scale2.lambda1", **attn)
  for i in range(n_blocks):
    rules += vit.block_rules(i, f"encoder.layer.{i}.", names, fused_qkv=False,
                             layer_scale=layer_scale)
  return rules


def convert(state: Mapping[str, Any], template: Mapping[str, Any], source: str, *,
            n_blocks: int, layer_scale: bool = True, name: str = "dinov2") -> dict:
  """Official or Hugging Face DINOv2 state dict -> params of ``vit.ViT``.

  Args:
    state: flat state dict.
    template: params shapes of the module.
    source: file name for messages.
    n_blocks: blocks built by the module (up to the last tap).
    layer_scale: whether the model has LayerScale.
    name: backbone name for messages.

  Returns:
    params tree.
  """
  # A teacher checkpoint holds backbone.* beside its heads, a classifier file dinov2.* beside
  # classifier.*: the patch embedding shows which part is the backbone.
  state = mapping.strip_prefix(state, ("module.", "backbone.", "dinov2."), anchors=(
      "patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"))
  if "pos_embed" in state:
    rules = _official_rules(n_blocks, layer_scale)
    ignore = [r"norm\.(weight|bias)", r"mask_token", r"head\..*", r"(dino|ibot)_head\..*",
              mapping.index_at_least(r"blocks\.", n_blocks)]
  else:
    old = any(".attention.attention.query." in k for k in state)
    rules = _hf_rules(n_blocks, layer_scale, _HF_ATTN_OLD if old else _HF_ATTN_NEW)
    ignore = [r"layernorm\.(weight|bias)", r"embeddings\.mask_token",
              mapping.index_at_least(r"encoder\.layer\.", n_blocks), r"classifier\..*"]
  return mapping.apply_rules(state, rules, template, ignore=ignore, source=source, model=name)


def make(name: str, **overrides: Any) -> base.Backbone:
  """Build a DINOv2-style backbone.

  Args:
    name: 'dinov2-base', 'dinov2-large' or 'tiny-vit'.
    **overrides: any of width, depth, heads, mlp_dim, patch, pos_grid, taps, input_size,
      interpolate_offset, layer_scale, eps, mean, std.

  Returns:
    The backbone.
  """
  cfg = dict(patch=14, pos_grid=37, input_size=224, interpolate_offset=0.1, layer_scale=True,
             eps=1e-6, mean=base.IMAGENET_MEAN, std=base.IMAGENET_STD)
  cfg.update(CONFIGS[name])
  base.check_overrides(name, overrides, list(cfg) + ["mlp_dim"])
  cfg.update(overrides)
  cfg.setdefault("mlp_dim", 4 * cfg["width"])
  taps = base.taps_to_levels(cfg["taps"], cfg["depth"], name)
  module = vit.ViT(width=cfg["width"], depth=cfg["depth"], heads=cfg["heads"],
                   mlp_dim=cfg["mlp_dim"], patch=cfg["patch"], pos_grid=cfg["pos_grid"],
                   taps=taps, act="gelu", eps=cfg["eps"], patch_bias=True, ln_pre=False,
                   layer_scale=cfg["layer_scale"],
                   interpolate_offset=cfg["interpolate_offset"])
  n_blocks = vit.num_built_blocks(taps)

  def conv(state, template, source):
    return convert(state, template, source, n_blocks=n_blocks, layer_scale=cfg["layer_scale"],
                   name=name)

  return base.Backbone(
      name=name, module=module, input_size=cfg["input_size"], mean=tuple(cfg["mean"]),
      std=tuple(cfg["std"]), level_dims=(cfg["width"],) * len(taps),
      level_strides=(cfg["patch"],) * len(taps), convert=conv, config=cfg, fixed_size=False,
      size_multiple=cfg["patch"])
