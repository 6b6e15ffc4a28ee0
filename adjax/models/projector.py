"""The ADPretrain feature projector (SPEC section 3): one block per feature level.

A block holds learnable reference tokens. Each image token attends to their projection
(query = token, key = value = projected reference tokens) and the attention output is
*subtracted* from the token: what the learned "normal" references explain is removed. An MLP
with a squeeze-excite gate over all tokens of the image follows, with a residual connection.

Unlike the PyTorch reference, which projects the 2048 reference tokens (and their keys and
values) again for every image, the reference projection, keys and values are computed once per
call and shared by the whole batch.

Parameter names follow the reference state_dict (`adjax/convert/projector.py` maps them one to
one): `l{k}_proj/{x_ref, ref_proj, layers_{i}/{cross_attn/{query,key,value,out}, mlp/{fc1, se/
{fc1, fc2}, fc2}}}`. Flax kernels are (in, out), the transpose of PyTorch's weights.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from adjax.models.reference_attention import reference_attention

Array = jax.Array
Params = dict[str, Any]

DEFAULT_NUM_HEADS = 16
DEFAULT_NUM_REF_TOKENS = 2048


def se_hidden_dim(mlp_dim: int) -> int:
  """Squeeze-excite width: mlp_dim / 16 rounded to the nearest multiple of 8 (halves up), >= 8."""
  return max(8, int(mlp_dim / 16 + 4) // 8 * 8)


def _torch_linear_bias_init(fan_in: int):
  """PyTorch's default Linear/Conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# PyTorch's default Linear weight init (kaiming_uniform with a = sqrt(5)) is U(+-1/sqrt(fan_in)).
_torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _linear(features: int, fan_in: int, dtype: Any, name: str) -> nn.Dense:
  """A Dense layer initialised as torch.nn.Linear, computing in `dtype`."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=_torch_linear_kernel_init,
                  bias_init=_torch_linear_bias_init(fan_in), name=name)


class _KeyProjection(nn.Module):
  """The key projection, whose bias gets an exactly zero gradient.

  Adding the same vector to every key shifts each query's logits by a constant, which the
  softmax removes: the key bias's true gradient is zero. Autodiff returns float noise instead,
  and Adam divides it by its own tiny magnitude into full-size random steps (which made the
  8-device and 1-device runs differ by ~lr). The stop_gradient makes it the exact zero.
  """
  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.initializers.xavier_uniform(), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    dtype = self.dtype or x.dtype
    return (x.astype(dtype) @ kernel.astype(dtype)
            + jax.lax.stop_gradient(bias).astype(dtype))


class _CrossAttention(nn.Module):
  """Multi-head attention of image tokens (queries) over shared reference tokens."""
  dim: int
  num_heads: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, ref: Array) -> Array:
    # x: (B, L, C) image tokens; ref: (R, C) projected reference tokens, shared by the batch.
    head_dim = self.dim // self.num_heads
    # torch.nn.MultiheadAttention: xavier-uniform in_proj (here per q/k/v slice, which only
    # changes the init's fan), zero in_proj and out_proj biases. Kernels are (C, C), split into
    # heads after the matmul, so the parameter tree does not depend on the head count.
    def dense(name: str) -> nn.Dense:
      return nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=nn.initializers.xavier_uniform(),
                      bias_init=nn.initializers.zeros, name=name)

    # Heads lead, (H, B*L, d) with the batch's tokens flattened: reference_attention works per
    # head (a plain 2-D matmul per block on CPU, one batched matmul on accelerators).
    b, l, _ = x.shape
    heads = lambda t: t.reshape(t.shape[0], self.num_heads, head_dim).transpose(1, 0, 2)
    q = heads(dense("query")(x).reshape(b * l, self.dim))   # (H, B*L, d)
    k = heads(_KeyProjection(self.dim, self.dtype, name="key")(ref))  # (H, R, d), once per call
    v = heads(dense("value")(ref))                           # (H, R, d), once per call
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
    attended = reference_attention(q, k, v)                   # (H, B*L, d)
    attended = attended.transpose(1, 0, 2).reshape(b, l, self.dim)
    return nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=_torch_linear_kernel_init, bias_init=nn.initializers.zeros,
                    name="out")(attended)


class _SqueezeExcite(nn.Module):
  """One gate per channel per image, from the mean over the image's tokens."""
  dim: int
  dtype: Any = None

  @nn.compact
  def __call__(self, h: Array) -> Array:
    hidden = se_hidden_dim(self.dim)
    squeezed = jnp.mean(h.astype(jnp.float32), axis=1, keepdims=True).astype(h.dtype)
    gate = _linear(hidden, self.dim, self.dtype, "fc1")(squeezed)
    gate = _linear(self.dim, hidden, self.dtype, "fc2")(nn.relu(gate))
    return h * nn.sigmoid(gate)


class _SqueezeExciteMLP(nn.Module):
  """fc1 -> squeeze-excite gate over the image's tokens -> exact GELU -> fc2."""
  dim: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    mlp_dim = 4 * self.dim
    h = _linear(mlp_dim, self.dim, self.dtype, "fc1")(x)                  # (B, L, 4C)
    h = _SqueezeExcite(mlp_dim, self.dtype, name="se")(h)
    return _linear(self.dim, mlp_dim, self.dtype, "fc2")(nn.gelu(h, approximate=False))


class ProjectorLayer(nn.Module):
  """x1 = x - attention(x, ref); out = x1 + mlp(x1)."""
  dim: int
  num_heads: int = DEFAULT_NUM_HEADS
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, ref: Array) -> Array:
    x = x - _CrossAttention(self.dim, self.num_heads, self.dtype, name="cross_attn")(x, ref)
    return x + _SqueezeExciteMLP(self.dim, self.dtype, name="mlp")(x)


class ProjectorBlock(nn.Module):
  """The projector of one feature level: (B, L, C) tokens in, (B, L, C) out."""
  dim: int
  num_heads: int = DEFAULT_NUM_HEADS
  num_ref_tokens: int = DEFAULT_NUM_REF_TOKENS
  depth: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.dim % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide the level's channels {self.dim}")
    x_ref = self.param("x_ref", nn.initializers.normal(1.0), (self.num_ref_tokens, self.dim))
    # The reference's ref_proj is a 1x1 Conv1d over the tokens, i.e. a Linear; computed once.
    ref = _linear(self.dim, self.dim, self.dtype, "ref_proj")(x_ref)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    for i in range(self.depth):
      x = ProjectorLayer(self.dim, self.num_heads, self.dtype, name=f"layers_{i}")(x, ref)
    return x


def level_key(index: int) -> str:
  """Parameter-tree name of level `index` (0-based): the reference's `l{index+1}_proj`."""
  return f"l{index + 1}_proj"


def _block_for(level_params: Params, num_heads: int, dtype: Any) -> ProjectorBlock:
  """Rebuilds the module that owns `level_params` from their shapes (a pure apply needs no
  config beyond the head count, which shapes cannot tell)."""
  num_ref_tokens, dim = level_params["x_ref"].shape
  depth = sum(1 for name in level_params if name.startswith("layers_"))
  return ProjectorBlock(dim=dim, num_heads=num_heads, num_ref_tokens=num_ref_tokens,
                        depth=depth, dtype=dtype)


def init_projector(rng: Array, level_dims: Sequence[int], *,
                   num_heads: int = DEFAULT_NUM_HEADS,
                   num_ref_tokens: int = DEFAULT_NUM_REF_TOKENS,
                   depth: int = 1) -> Params:
  """Random projector parameters (float32), initialised as the PyTorch reference does.

  Args:
    rng: PRNG key.
    level_dims: channels C_k of each level.
    num_heads: attention heads; must divide every C_k.
    num_ref_tokens: learnable reference tokens per level (2048 in the paper).
    depth: projector layers per level (1 in the paper).

  Returns:
    {"l1_proj": ..., "l2_proj": ...}, one subtree per level.
  """
  params = {}
  for k, dim in enumerate(level_dims):
    block = ProjectorBlock(dim=dim, num_heads=num_heads, num_ref_tokens=num_ref_tokens,
                           depth=depth)
    dummy = jnp.zeros((1, 1, dim), jnp.float32)
    params[level_key(k)] = block.init(jax.random.fold_in(rng, k), dummy)["params"]
  return params


def project(params: Params, levels: Sequence[Array], *, num_heads: int = DEFAULT_NUM_HEADS,
            dtype: Any = None) -> list[Array]:
  """Applies the projector to every level.

  Args:
    params: from `init_projector` or `projector_from_torch`.
    levels: list of (B, H, W, C_k) arrays, one per level, in level order.
    num_heads: attention heads (16 in the paper).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32. None: the input's.

  Returns:
    list of (B, H, W, C_k) arrays in the compute dtype.
  """
  if "params" in params and len(params) == 1:
    params = params["params"]
  if len(levels) != len(params):
    raise ValueError(f"got {len(levels)} feature levels for a projector of {len(params)}")
  outputs = []
  for k, level in enumerate(levels):
    level_params = params[level_key(k)]
    b, h, w, c = level.shape
    if c != level_params["x_ref"].shape[1]:
      raise ValueError(f"level {k + 1} has {c} channels; its projector expects "
                       f"{level_params['x_ref'].shape[1]}")
    block = _block_for(level_params, num_heads, dtype)
    out = block.apply({"params": level_params}, level.reshape(b, h * w, c))
    outputs.append(out.reshape(b, h, w, c))
  return outputs
