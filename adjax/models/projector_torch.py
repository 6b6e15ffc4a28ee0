"""Projector weights to and from the PyTorch reference's state_dict (docs/method.md section 3).

The reference keys (per level k = 1..K, per layer i) and our tree paths:

  l{k}_proj.x_ref                                  (1, R, C)  x_ref                    (R, C)
  l{k}_proj.ref_proj.project.weight/bias           (C, C, 1)  ref_proj/kernel, bias    (C, C)^T
  l{k}_proj.layers.{i}.cross_attn.in_proj_weight   (3C, C)    layers_{i}/cross_attn/{query,
                                                               key,value}
  l{k}_proj.layers.{i}.cross_attn.out_proj.weight  (C, C)     layers_{i}/cross_attn/out
  l{k}_proj.layers.{i}.mlp.fc1 / fc2 / se.fc1 / se.fc2        layers_{i}/mlp/fc1, fc2, se/...

Linear weights are (out, in) in PyTorch and kernels are (in, out) here. Every shape is checked
against the one docs/method.md section 3 gives for the level's C (read from x_ref), MLP width 4C and
squeeze-excite width se_hidden_dim(4C) included.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from adjax.models.projector import se_hidden_dim

Params = dict[str, Any]

_LEVEL_KEY = re.compile(r"^l(\d+)_proj\.")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")
# (torch key suffix inside a layer, tree path inside a layer) for the plain Linear layers.
_LAYER_LINEARS = (
    ("cross_attn.out_proj", ("cross_attn", "out")),
    ("mlp.fc1", ("mlp", "fc1")),
    ("mlp.fc2", ("mlp", "fc2")),
    ("mlp.se.fc1", ("mlp", "se", "fc1")),
    ("mlp.se.fc2", ("mlp", "se", "fc2")),
)


def _to_numpy(value: Any, key: str) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; torch is only present when the caller has it
    value = value.detach().cpu().float().numpy()
  try:
    return np.asarray(value, dtype=np.float32)
  except (TypeError, ValueError) as err:
    raise ValueError(f"projector state_dict key {key!r}: expected an array, got "
                     f"{type(value).__name__}") from err


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"expected a mapping of projector keys to arrays, got "
                     f"{type(state_dict).__name__}")
  if "projectors" in state_dict:  # the released ADPretrain checkpoints: {"projectors": sd, ...}
    return _unwrap(state_dict["projectors"])
  prefix = "module."  # saved from a DataParallel / DistributedDataParallel wrapper
  if state_dict and all(isinstance(key, str) and key.startswith(prefix) for key in state_dict):
    return {key[len(prefix):]: value for key, value in state_dict.items()}
  return state_dict


def _expected_shapes(level: int, depth: int, num_ref: int, dim: int
                     ) -> dict[str, tuple[int, ...]]:
  """Every key of level ``level`` with its PyTorch shape (docs/method.md section 3), from R and C.

  The MLP width is 4C and the squeeze-excite width se_hidden_dim(4C), as the model builds
  them: reading widths from the file instead would accept weights that ``project`` cannot run
  and would blame a later key for an earlier key's wrong shape.
  """
  mlp = 4 * dim
  se = se_hidden_dim(mlp)
  prefix = f"l{level}_proj."
  shapes = {prefix + "x_ref": (1, num_ref, dim),
            prefix + "ref_proj.project.weight": (dim, dim, 1),
            prefix + "ref_proj.project.bias": (dim,)}
  linears = {"cross_attn.out_proj": (dim, dim), "mlp.fc1": (mlp, dim), "mlp.fc2": (dim, mlp),
             "mlp.se.fc1": (se, mlp), "mlp.se.fc2": (mlp, se)}
  for i in range(depth):
    layer = f"{prefix}layers.{i}."
    shapes[layer + "cross_attn.in_proj_weight"] = (3 * dim, dim)
    shapes[layer + "cross_attn.in_proj_bias"] = (3 * dim,)
    for torch_name, _ in _LAYER_LINEARS:
      out_features, in_features = linears[torch_name]
      shapes[f"{layer}{torch_name}.weight"] = (out_features, in_features)
      shapes[f"{layer}{torch_name}.bias"] = (out_features,)
  return shapes


def projector_from_torch(state_dict: Mapping[str, Any]) -> Params:
  """Builds adjax projector parameters from the reference's state_dict.

  Args:
    state_dict: reference keys (`l1_proj.x_ref`, ...) to numpy arrays or torch tensors, or the
      released checkpoint form `{"projectors": state_dict, ...}`; keys may carry the `module.`
      prefix of a DataParallel / DistributedDataParallel save.

  Returns:
    The parameter tree of `adjax.models.projector` (float32 numpy arrays).

  Raises:
    ValueError: naming any missing, unexpected or mis-shaped key (with the shape found and the
      shape docs/method.md section 3 gives for the level's channel count C), or a level
      without layers.
  """
  raw = _unwrap(state_dict)
  if not any(_LEVEL_KEY.match(str(key)) for key in raw):
    raise ValueError(f"the state_dict has no projector keys (expected 'l1_proj.x_ref', ...); "
                     f"found {list(raw)[:5]}")
  unexpected = [key for key in raw if not _LEVEL_KEY.match(str(key))]
  if unexpected:
    raise ValueError(f"unexpected projector state_dict keys: {unexpected[:5]}")
  sd = {key: _to_numpy(value, key) for key, value in raw.items()}
  levels = sorted({int(m.group(1)) for key in sd if (m := _LEVEL_KEY.match(key))})
  if levels != list(range(1, len(levels) + 1)):
    raise ValueError(f"projector levels must be l1..lK without gaps, found {levels}")

  params: Params = {}
  for level in levels:
    prefix = f"l{level}_proj."
    indices = {int(m.group(1)) for key in sd if key.startswith(prefix)
               and (m := _LAYER_KEY.match(key[len(prefix):]))}
    if not indices:
      raise ValueError(f"projector level {prefix[:-1]} has no '{prefix}layers.0.*' keys: a "
                       "block needs at least one cross-attention layer")
    depth = max(indices) + 1
    x_ref = sd.get(prefix + "x_ref")
    if x_ref is None:
      raise ValueError(f"projector state_dict is missing keys: {[prefix + 'x_ref']}")
    if x_ref.ndim != 3 or x_ref.shape[0] != 1:
      raise ValueError(f"projector state_dict key {prefix + 'x_ref'!r} has shape {x_ref.shape}, "
                       "expected (1, R, C)")
    _, num_ref, dim = x_ref.shape
    shapes = _expected_shapes(level, depth, num_ref, dim)
    missing = [key for key in shapes if key not in sd]
    if missing:
      raise ValueError(f"projector state_dict is missing keys: {missing[:5]}")
    extra = [key for key in sd if key.startswith(prefix) and key not in shapes]
    if extra:
      raise ValueError(f"unexpected projector state_dict keys: {extra[:5]}")
    for key, shape in shapes.items():
      if sd[key].shape != shape:
        raise ValueError(
            f"projector state_dict key {key!r} has shape {sd[key].shape}, expected {shape} "
            f"(C = {dim} from {prefix + 'x_ref'!r} of shape {x_ref.shape}, docs/method.md "
            "section 3)")

    tree: Params = {
        "x_ref": x_ref[0],
        "ref_proj": {"kernel": sd[prefix + "ref_proj.project.weight"][:, :, 0].T,
                     "bias": sd[prefix + "ref_proj.project.bias"]},
    }
    for i in range(depth):
      layer_prefix = f"{prefix}layers.{i}."
      in_w = sd[layer_prefix + "cross_attn.in_proj_weight"]
      in_b = sd[layer_prefix + "cross_attn.in_proj_bias"]
      layer: Params = {"cross_attn": {
          name: {"kernel": in_w[j * dim:(j + 1) * dim].T, "bias": in_b[j * dim:(j + 1) * dim]}
          for j, name in enumerate(("query", "key", "value"))}}
      for torch_name, path in _LAYER_LINEARS:
        node = layer
        for name in path[:-1]:
          node = node.setdefault(name, {})
        node[path[-1]] = {"kernel": sd[f"{layer_prefix}{torch_name}.weight"].T,
                          "bias": sd[f"{layer_prefix}{torch_name}.bias"]}
      tree[f"layers_{i}"] = layer
    params[f"l{level}_proj"] = tree
  return params


def projector_to_torch(params: Params) -> dict[str, np.ndarray]:
  """The reference's state_dict (numpy arrays) for adjax projector parameters.

  `torch_module.load_state_dict({k: torch.from_numpy(v) ...}, strict=True)` accepts it.
  """
  if "params" in params and len(params) == 1:
    params = params["params"]
  out: dict[str, np.ndarray] = {}
  as_np = lambda x: np.ascontiguousarray(np.asarray(x, dtype=np.float32))
  for level_name in sorted(params, key=lambda name: int(name[1:].split("_")[0])):
    tree = params[level_name]
    prefix = f"{level_name}."
    out[prefix + "x_ref"] = as_np(tree["x_ref"])[None]
    out[prefix + "ref_proj.project.weight"] = as_np(tree["ref_proj"]["kernel"]).T[:, :, None].copy()
    out[prefix + "ref_proj.project.bias"] = as_np(tree["ref_proj"]["bias"])
    depth = sum(1 for name in tree if name.startswith("layers_"))
    for i in range(depth):
      layer = tree[f"layers_{i}"]
      layer_prefix = f"{prefix}layers.{i}."
      attn = layer["cross_attn"]
      out[layer_prefix + "cross_attn.in_proj_weight"] = np.concatenate(
          [as_np(attn[name]["kernel"]).T for name in ("query", "key", "value")], axis=0)
      out[layer_prefix + "cross_attn.in_proj_bias"] = np.concatenate(
          [as_np(attn[name]["bias"]) for name in ("query", "key", "value")], axis=0)
      for torch_name, path in _LAYER_LINEARS:
        node = layer
        for name in path:
          node = node[name]
        out[f"{layer_prefix}{torch_name}.weight"] = as_np(node["kernel"]).T.copy()
        out[f"{layer_prefix}{torch_name}.bias"] = as_np(node["bias"])
  return out
