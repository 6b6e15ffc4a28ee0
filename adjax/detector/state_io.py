"""A fitted method's state (a pytree of dicts, lists and tuples of arrays and plain numbers)
as JSON plus named arrays, so that a detector folder holds no pickle: the arrays go to a
safetensors file, the structure to the manifest."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def to_arrays(tree: Any, prefix: str = "state") -> tuple[Any, dict[str, np.ndarray]]:
  """(skeleton, arrays): the skeleton is JSON with {"array": name} where the arrays were."""
  arrays: dict[str, np.ndarray] = {}

  def walk(node: Any, path: str) -> Any:
    if isinstance(node, Mapping):
      if not all(isinstance(k, str) for k in node):
        raise TypeError(f"{path}: only string keys can be stored, got {list(node)}")
      return {"dict": {k: walk(v, f"{path}/{k}") for k, v in node.items()}}
    if isinstance(node, (list, tuple)):
      kind = "list" if isinstance(node, list) else "tuple"
      return {kind: [walk(v, f"{path}/{i}") for i, v in enumerate(node)]}
    if node is None or isinstance(node, (bool, int, float, str)):
      return {"value": node}
    if hasattr(node, "shape") and hasattr(node, "dtype"):
      arrays[path] = np.asarray(node)
      return {"array": path}
    raise TypeError(f"{path}: cannot store a {type(node).__name__}")

  return walk(tree, prefix), arrays


def from_arrays(skeleton: Any, arrays: Mapping[str, np.ndarray]) -> Any:
  """The tree `to_arrays` took apart.

  Raises:
    ValueError: a malformed skeleton or an array it names that is missing.
  """
  if not isinstance(skeleton, Mapping) or len(skeleton) != 1:
    raise ValueError(f"malformed state entry {str(skeleton)[:80]!r}")
  (kind, body), = skeleton.items()
  if kind == "dict" and isinstance(body, Mapping):
    return {k: from_arrays(v, arrays) for k, v in body.items()}
  if kind in ("list", "tuple") and isinstance(body, list):
    items = [from_arrays(v, arrays) for v in body]
    return items if kind == "list" else tuple(items)
  if kind == "value" and (body is None or isinstance(body, (bool, int, float, str))):
    return body
  if kind == "array" and isinstance(body, str):
    if body not in arrays:
      raise ValueError(f"the state names array {body!r}, which is not stored")
    return arrays[body]
  raise ValueError(f"malformed state entry {str(skeleton)[:80]!r}")
