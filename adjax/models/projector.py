"""The ADPretrain feature projector (docs/method.md section 3): one block per feature level.

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

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from adjax.models.matmul import matmul
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


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _exact_gelu(x: Array) -> Array:
  """x Phi(x) with the erf, as torch.nn.GELU() computes it.

  Why not nn.gelu(approximate=False): it goes through erfc, which XLA:CPU expands into an
  exponential and two branches, three passes over the (T, 4C) activations; lax.erf is one
  polynomial (forward on 2048 x 3072: 12 -> 4.5 ms). Its derivative is
  `_exact_gelu_derivative`, which _gated_gelu's backward uses.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * _INV_SQRT2))


def _exact_gelu_derivative(x: Array) -> Array:
  """d/dx x Phi(x) = Phi(x) + x phi(x)."""
  cdf = 0.5 * (1.0 + jax.lax.erf(x * _INV_SQRT2))
  return cdf + x * jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _declare_linear(module: nn.Module, in_features: int, features: int,
                    kernel_init: Callable[..., Array],
                    bias_init: Callable[..., Array]) -> tuple[Array, Array]:
  """Declares a linear layer's float32 `kernel` (in, out) and `bias` on `module`, in nn.Dense's
  names and order."""
  kernel = module.param("kernel", kernel_init, (in_features, features), jnp.float32)
  bias = module.param("bias", bias_init, (features,), jnp.float32)
  return kernel, bias


class _Linear(nn.Module):
  """y = x W + b over the last axis (W is (in, out)); leading axes are flattened into one.

  Why flattened: for (B, L, C) inputs the weight gradient contracts two axes, and XLA:CPU then
  transposes the (B*L, out) cotangent in memory first (25 MB per MLP layer at batch 4); on
  (B*L, C) it contracts one axis without the copy (squeeze-excite MLP forward + backward at
  batch 4, C = 768: 420 -> 340 ms). Parameter names and init order are those of nn.Dense.
  """
  features: int
  kernel_init: Callable[..., Array]
  bias_init: Callable[..., Array]
  dtype: Any = None
  # The key projection's bias: adding the same vector to every key shifts each query's logits
  # by a constant, which the softmax removes, so its true gradient is zero. Autodiff returns
  # float noise instead, and Adam divides it by its own tiny magnitude into full-size random
  # steps (which made 8-device and 1-device runs differ by ~lr): stop_gradient makes it 0.
  zero_bias_gradient: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel, bias = _declare_linear(self, x.shape[-1], self.features, self.kernel_init,
                                   self.bias_init)
    if self.zero_bias_gradient:
      bias = jax.lax.stop_gradient(bias)
    dtype = self.dtype or jnp.promote_types(x.dtype, kernel.dtype)
    flat = x.reshape(-1, x.shape[-1]).astype(dtype)
    y = matmul(flat, kernel.astype(dtype)) + bias.astype(dtype)
    return y.reshape(*x.shape[:-1], self.features)


def _torch_linear(features: int, fan_in: int, dtype: Any, name: str) -> _Linear:
  """A linear layer initialised as torch.nn.Linear, computing in `dtype`."""
  return _Linear(features, _torch_linear_kernel_init, _torch_linear_bias_init(fan_in), dtype,
                 name=name)


class _CrossAttention(nn.Module):
  """Multi-head attention of image tokens (queries) over shared reference tokens."""
  dim: int
  num_heads: int
  dtype: Any = None
  attention: str = "auto"   # projector.attention: see adjax/models/reference_attention.py

  @nn.compact
  def __call__(self, x: Array, ref: Array) -> Array:
    # x: (T, C) image tokens of the whole batch; ref: (R, C) projected reference tokens.
    head_dim = self.dim // self.num_heads
    # torch.nn.MultiheadAttention: xavier-uniform in_proj (here per q/k/v slice, which only
    # changes the init's fan), zero in_proj and out_proj biases. Kernels are (C, C), split into
    # heads after the matmul, so the parameter tree does not depend on the head count.
    def in_proj(name: str, **kwargs) -> _Linear:
      return _Linear(self.dim, nn.initializers.xavier_uniform(), nn.initializers.zeros,
                     self.dtype, name=name, **kwargs)

    # Heads lead, (H, T, d): reference_attention works per head (the blocked and native forms
    # per head and block of queries; the others transpose back, and XLA cancels the pair).
    heads = lambda t: t.reshape(t.shape[0], self.num_heads, head_dim).transpose(1, 0, 2)
    q = heads(in_proj("query")(x))                                   # (H, T, d)
    k = heads(in_proj("key", zero_bias_gradient=True)(ref))          # (H, R, d), once per call
    v = heads(in_proj("value")(ref))                                 # (H, R, d), once per call
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
    attended = reference_attention(q, k, v, implementation=self.attention)   # (H, T, d)
    attended = attended.transpose(1, 0, 2).reshape(x.shape[0], self.dim)
    return _Linear(self.dim, _torch_linear_kernel_init, nn.initializers.zeros, self.dtype,
                   name="out")(attended)


class _LinearParams(nn.Module):
  """The kernel (in, out) and bias of a torch-initialised linear layer, for code that applies
  them itself (declared as _Linear declares them)."""
  in_features: int
  features: int

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    return _declare_linear(self, self.in_features, self.features, _torch_linear_kernel_init,
                           _torch_linear_bias_init(self.in_features))


class _SqueezeExciteParams(nn.Module):
  """The squeeze-excite gate's two linear layers (params `se/{fc1, fc2}/{kernel, bias}`)."""
  dim: int

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    hidden = se_hidden_dim(self.dim)
    w1, b1 = _LinearParams(self.dim, hidden, name="fc1")()
    w2, b2 = _LinearParams(hidden, self.dim, name="fc2")()
    return {"w1": w1, "b1": b1, "w2": w2, "b2": b2}


def _squeeze_excite_gate(squeezed: Array, se: dict[str, Array]) -> Array:
  """sigmoid(fc2(relu(fc1(mean)))): one gate per image and channel, (B, 4C)."""
  dtype = squeezed.dtype
  hidden = jax.nn.relu(squeezed @ se["w1"].astype(dtype) + se["b1"].astype(dtype))
  return jax.nn.sigmoid(hidden @ se["w2"].astype(dtype) + se["b2"].astype(dtype))


def _gated_gelu_forward(y: Array, bias: Array, se: dict[str, Array], tokens_per_image: int):
  # Elementwise work in float32 whatever y's dtype: XLA:CPU evaluates bfloat16 erf and exp
  # element by element (forward on 2048 x 3072: 16.5 ms in bfloat16, 3.8 ms in float32), and
  # the result is rounded to y's dtype once.
  wide = jnp.float32
  images = (y.astype(wide) + bias.astype(wide)).reshape(-1, tokens_per_image, y.shape[-1])  # h
  squeezed = jnp.mean(images, axis=1)                                                     # (B, 4C)
  gate, gate_vjp = jax.vjp(_squeeze_excite_gate, squeezed, se)
  out = _exact_gelu(images * gate[:, None, :]).reshape(y.shape).astype(y.dtype)
  return out, (y, bias, gate, gate_vjp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gated_gelu(y: Array, bias: Array, se: dict[str, Array], tokens_per_image: int) -> Array:
  """GELU(h * gate(mean over the image's tokens of h)) with h = y + bias, on (T, 4C).

  The middle of the squeeze-excite MLP, between fc1's matmul and fc2. Why a custom VJP: autodiff
  keeps several (T, 4C) intermediates (h, the gated h, the GELU's derivative) and adds the
  gate's share of dh in a pass of its own; the backward below keeps only y, recomputes h and
  the gated values in the pass that needs them, and folds the mean's share (dm / L) into the
  pass that writes dy (forward + backward per level at batch 4: 80 -> 61 ms, isolated).
  """
  return _gated_gelu_forward(y, bias, se, tokens_per_image)[0]


def _gated_gelu_fwd(y, bias, se, tokens_per_image):
  return _gated_gelu_forward(y, bias, se, tokens_per_image)


def _gated_gelu_bwd(tokens_per_image, residuals, d_out):
  y, bias, gate, gate_vjp = residuals
  wide = jnp.float32   # as in the forward pass
  images = (y.astype(wide) + bias.astype(wide)).reshape(-1, tokens_per_image, y.shape[-1])
  d_gated = (d_out.astype(wide).reshape(images.shape)
             * _exact_gelu_derivative(images * gate[:, None, :]))
  d_gate = jnp.sum(d_gated * images, axis=1)
  d_squeezed, d_se = gate_vjp(d_gate)
  # h feeds the output through the gated values and the gate through its mean over L tokens.
  d_images = d_gated * gate[:, None, :] + (d_squeezed / tokens_per_image)[:, None, :]
  d_y = d_images.reshape(y.shape)
  d_bias = jnp.sum(d_y, axis=0).astype(bias.dtype)
  return d_y.astype(y.dtype), d_bias, d_se


_gated_gelu.defvjp(_gated_gelu_fwd, _gated_gelu_bwd)


class _SqueezeExciteMLP(nn.Module):
  """fc1 -> squeeze-excite gate over the image's tokens -> exact GELU -> fc2."""
  dim: int
  tokens_per_image: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    mlp_dim = 4 * self.dim
    kernel, bias = _LinearParams(self.dim, mlp_dim, name="fc1")()
    dtype = self.dtype or jnp.promote_types(x.dtype, kernel.dtype)
    y = matmul(x.astype(dtype), kernel.astype(dtype))                           # (T, 4C)
    se = _SqueezeExciteParams(mlp_dim, name="se")()
    hidden = _gated_gelu(y, bias.astype(dtype), se, self.tokens_per_image)
    return _torch_linear(self.dim, mlp_dim, self.dtype, "fc2")(hidden)


class ProjectorLayer(nn.Module):
  """x1 = x - attention(x, ref); out = x1 + mlp(x1), on (T, C) tokens of whole images."""
  dim: int
  tokens_per_image: int
  num_heads: int = DEFAULT_NUM_HEADS
  dtype: Any = None
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: Array, ref: Array) -> Array:
    x = x - _CrossAttention(self.dim, self.num_heads, self.dtype, self.attention,
                            name="cross_attn")(x, ref)
    return x + _SqueezeExciteMLP(self.dim, self.tokens_per_image, self.dtype, name="mlp")(x)


class ProjectorBlock(nn.Module):
  """The projector of one feature level: (B, L, C) tokens in, (B, L, C) out."""
  dim: int
  num_heads: int = DEFAULT_NUM_HEADS
  num_ref_tokens: int = DEFAULT_NUM_REF_TOKENS
  depth: int = 1
  dtype: Any = None
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.dim % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide the level's channels {self.dim}")
    x_ref = self.param("x_ref", nn.initializers.normal(1.0), (self.num_ref_tokens, self.dim))
    # The reference's ref_proj is a 1x1 Conv1d over the tokens, i.e. a Linear; computed once.
    ref = _torch_linear(self.dim, self.dim, self.dtype, "ref_proj")(x_ref)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    b, l, c = x.shape
    # Every linear layer sees (B * L, C): see _Linear for why.
    tokens = x.reshape(b * l, c)
    for i in range(self.depth):
      tokens = ProjectorLayer(self.dim, l, self.num_heads, self.dtype, self.attention,
                              name=f"layers_{i}")(tokens, ref)
    return tokens.reshape(b, l, c)


def level_key(index: int) -> str:
  """Parameter-tree name of level `index` (0-based): the reference's `l{index+1}_proj`."""
  return f"l{index + 1}_proj"


def _block_for(level_params: Params, num_heads: int, dtype: Any,
               attention: str = "auto") -> ProjectorBlock:
  """Rebuilds the module that owns `level_params` from their shapes (a pure apply needs no
  config beyond the head count, which shapes cannot tell)."""
  num_ref_tokens, dim = level_params["x_ref"].shape
  depth = sum(1 for name in level_params if name.startswith("layers_"))
  return ProjectorBlock(dim=dim, num_heads=num_heads, num_ref_tokens=num_ref_tokens,
                        depth=depth, dtype=dtype, attention=attention)


def init_projector(rng: Array, level_dims: Sequence[int], *,
                   num_heads: int = DEFAULT_NUM_HEADS,
                   num_ref_tokens: int = DEFAULT_NUM_REF_TOKENS,
                   depth: int = 1, attention: str = "auto") -> Params:
  """Random projector parameters (float32), initialised as the PyTorch reference does.

  Args:
    rng: PRNG key.
    level_dims: channels C_k of each level.
    num_heads: attention heads; must divide every C_k.
    num_ref_tokens: learnable reference tokens per level (2048 in the paper).
    depth: projector layers per level (1 in the paper).
    attention: `projector.attention` (the parameters do not depend on it; init traces the
      module with it, so a setting that cannot run here fails now rather than in the step).

  Returns:
    {"l1_proj": ..., "l2_proj": ...}, one subtree per level.
  """
  return _init_levels(rng, tuple(int(d) for d in level_dims), num_heads, num_ref_tokens, depth,
                      attention)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _init_levels(rng: Array, level_dims: tuple[int, ...], num_heads: int, num_ref_tokens: int,
                 depth: int, attention: str) -> Params:
  # One compiled program: run op by op, the initialisers compiled ~60 small programs a level
  # (~8 s for a tiny projector on a CPU).
  params = {}
  for k, dim in enumerate(level_dims):
    block = ProjectorBlock(dim=dim, num_heads=num_heads, num_ref_tokens=num_ref_tokens,
                           depth=depth, attention=attention)
    dummy = jnp.zeros((1, 1, dim), jnp.float32)
    params[level_key(k)] = block.init(jax.random.fold_in(rng, k), dummy)["params"]
  return params


def project(params: Params, levels: Sequence[Array], *, num_heads: int = DEFAULT_NUM_HEADS,
            dtype: Any = None, attention: str = "auto") -> list[Array]:
  """Applies the projector to every level.

  Args:
    params: from `init_projector` or `projector_from_torch`.
    levels: list of (B, H, W, C_k) arrays, one per level, in level order.
    num_heads: attention heads (16 in the paper).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32. None: the input's.
    attention: `projector.attention`, the attention's implementation ("auto", "dense",
      "dot_product", "blocked", "native_cpu"; see adjax/models/reference_attention.py). Static:
      under jit it is part of the compiled program.

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
    block = _block_for(level_params, num_heads, dtype, attention)
    out = block.apply({"params": level_params}, level.reshape(b, h * w, c))
    outputs.append(out.reshape(b, h, w, c))
  return outputs
