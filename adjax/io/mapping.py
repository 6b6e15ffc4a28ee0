"""Name-to-name mapping tables from PyTorch state dicts to Flax parameter trees.

A model's conversion is a list of ``Rule``s: a target path in the Flax tree, the source key(s)
in the PyTorch state dict, and a small transform (transpose a Linear weight, permute a conv
kernel, stack q/k/v, sum a Conv3d's temporal slices ...). ``apply_rules`` runs a table and then
checks the result against the model's own parameter shapes: a source key that is missing, a
target the table does not fill, a shape that differs, or a checkpoint key that nothing used
(unless declared ignorable) is an error that names the keys, so a wrong file or a wrong
configuration cannot load silently.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from adjax.errors import UserError

__all__ = [
    "Rule", "ConversionError", "apply_rules", "index_at_least", "flatten_tree",
    "unflatten_tree", "strip_prefix",
    "linear", "conv2d", "depthwise2d", "identity", "reshape", "stack_linear", "stack_bias",
    "sum_temporal_conv3d", "to_float32",
]

Array = np.ndarray
StateDict = Mapping[str, Array]


class ConversionError(UserError):
  """A checkpoint does not match the model it is loaded into."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """One target parameter, built from one or more source tensors.

  Attributes:
    target: '/'-joined path in the Flax params tree, e.g. ``"blocks_0/attn/qkv/kernel"``.
    sources: the state-dict keys passed, in order, to ``fn``.
    fn: transform from the source arrays (float32) to the target array.
  """
  target: str
  sources: tuple[str, ...]
  fn: Callable[..., Array] = None  # type: ignore[assignment]

  def __post_init__(self):
    if isinstance(self.sources, str):
      object.__setattr__(self, "sources", (self.sources,))
    if self.fn is None:
      object.__setattr__(self, "fn", identity)


# ----------------------------------------------------------------------------- transforms
def to_float32(x: Array) -> Array:
  """Any float/bf16 array as float32 (weights are converted once, then cast at run time)."""
  return np.asarray(x, dtype=np.float32)


def identity(x: Array) -> Array:
  """Unchanged (as float32)."""
  return to_float32(x)


def linear(w: Array) -> Array:
  """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
  return to_float32(w).T


def conv2d(w: Array) -> Array:
  """torch Conv2d weight (O, I, kh, kw) -> Flax Conv kernel (kh, kw, I, O)."""
  return to_float32(w).transpose(2, 3, 1, 0)


depthwise2d = conv2d  # (C, 1, kh, kw) -> (kh, kw, 1, C): a grouped conv with C groups


def sum_temporal_conv3d(w: Array) -> Array:
  """torch Conv3d weight (O, I, T, kh, kw) -> Conv2d kernel (kh, kw, I, O) summed over T.

  A Conv3d whose T input frames are identical copies of one image equals a Conv2d whose kernel
  is the sum of its T temporal slices (ImageBind feeds an image as two equal frames).
  """
  return to_float32(w).sum(axis=2).transpose(2, 3, 1, 0)


def reshape(*shape: int) -> Callable[[Array], Array]:
  """A transform that reshapes (as float32) to ``shape``."""
  return lambda x: to_float32(x).reshape(shape)


def stack_linear(*ws: Array) -> Array:
  """Separate q, k, v Linear weights (out, in) -> one fused Dense kernel (in, 3 * out)."""
  return np.concatenate([to_float32(w) for w in ws], axis=0).T


def stack_bias(*bs: Array) -> Array:
  """Separate q, k, v biases -> one fused bias."""
  return np.concatenate([to_float32(b) for b in bs], axis=0)


# ----------------------------------------------------------------------------- trees
def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dict -> ``{'a/b/c': leaf}``."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, path + "/"))
    else:
      out[path] = v
  return out


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{'a/b/c': leaf}`` -> nested dict."""
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def strip_prefix(state: StateDict, prefixes: Sequence[str], *,
                 anchors: Sequence[str] = ()) -> dict[str, Array]:
  """Remove wrapper prefixes ('module.' of DataParallel, 'backbone.' of a DINOv2 teacher ...).

  Each prefix in turn is removed from every key when every key carries it. A file can also
  hold the backbone under a prefix beside other parts: a Hugging Face
  ``Dinov2ForImageClassification`` (``dinov2.*`` plus ``classifier.*``) or a DINOv2 teacher
  (``backbone.*`` plus ``dino_head.*`` / ``ibot_head.*``). Then the prefix is removed from the
  keys that carry it when one of ``anchors`` (a key only the backbone has, such as its patch
  embedding) is found under the prefix and none is found without it; the other keys are kept
  as they are, for the caller's ignore rules or the unused-key error of ``apply_rules``.

  Args:
    state: flat state dict.
    prefixes: prefixes to try, in order (each one that applies is removed).
    anchors: backbone keys (without prefix) that show where the backbone is.

  Returns:
    The state dict with the prefixes removed.

  Raises:
    ConversionError: removing a prefix would give two tensors the same key.
  """
  state = dict(state)
  for p in prefixes:
    carried = [k for k in state if k.startswith(p)]
    if not carried:
      continue
    if len(carried) < len(state):
      # Only part of the file is under p: strip it only if the backbone is that part.
      if not any(p + a in state for a in anchors) or any(a in state for a in anchors):
        continue
      others = set(state) - set(carried)
      clash = sorted(k for k in carried if k[len(p):] in others)
      if clash:
        raise ConversionError(
            f"cannot remove the prefix {p!r}: {clash[:4]} would then clash with the keys "
            f"{[k[len(p):] for k in clash[:4]]} already in the checkpoint")
    state = {(k[len(p):] if k.startswith(p) else k): v for k, v in state.items()}
  return state


def index_at_least(prefix: str, n: int) -> Callable[[str], bool]:
  r"""Predicate: the key is ``<prefix><i>.<...>`` with integer i >= n (blocks past the taps).

  Args:
    prefix: regular expression of the part before the index, e.g. ``r"blocks\."``.
    n: first index that matches.

  Returns:
    The predicate.
  """
  pattern = re.compile(prefix + r"(\d+)\..*")

  def test(key: str) -> bool:
    m = pattern.fullmatch(key)
    return bool(m) and int(m.group(1)) >= n

  return test


def apply_rules(state: StateDict, rules: Iterable[Rule], template: Mapping[str, Any], *,
                ignore: Sequence[str | Callable[[str], bool]] = (), source: str = "checkpoint",
                model: str = "model") -> dict[str, Any]:
  """Build a Flax params tree from a state dict with a mapping table, and check it.

  Args:
    state: flat ``{key: array}`` state dict.
    rules: the mapping table.
    template: the model's params tree (arrays or ``jax.ShapeDtypeStruct``s) giving the expected
      paths and shapes.
    ignore: regular expressions (``re.fullmatch``) or predicates for checkpoint keys the model
      does not use (heads, final norms, other modalities, blocks past the last tap ...).
    source: name of the checkpoint, for error messages.
    model: name of the model, for error messages.

  Returns:
    The nested params tree of float32 numpy arrays.

  Raises:
    ConversionError: missing source keys, targets left unfilled, shape mismatches, or unused
      checkpoint keys; the message lists them.
  """
  rules = list(rules)
  expected = flatten_tree(template)
  missing = sorted({s for r in rules for s in r.sources if s not in state})
  if missing:
    raise ConversionError(
        f"{source} does not look like a {model} checkpoint: {len(missing)} expected keys are "
        f"missing, e.g. {missing[:8]} (found keys like {sorted(state)[:8]})")
  flat: dict[str, Array] = {}
  used: set[str] = set()
  for r in rules:
    try:
      flat[r.target] = r.fn(*(state[s] for s in r.sources))
    except (ValueError, TypeError, IndexError) as err:
      # A tensor of the wrong rank or size for its transform (transpose, stack, reshape): the
      # shape check below never sees it, so name the keys here instead of a numpy traceback.
      raise ConversionError(
          f"cannot load {source} into {model}: {', '.join(r.sources)} -> {r.target}: "
          f"{' '.join(str(err).split())[:200]} (shapes "
          f"{[tuple(np.shape(state[s])) for s in r.sources]})") from None
    used.update(r.sources)
  problems = []
  unfilled = sorted(set(expected) - set(flat))
  if unfilled:
    problems.append(f"parameters not filled by the mapping table: {unfilled[:8]}")
  extra = sorted(set(flat) - set(expected))
  if extra:
    problems.append(f"mapping targets that the model does not have: {extra[:8]}")
  bad = [f"{k}: checkpoint {tuple(flat[k].shape)} vs model {tuple(expected[k].shape)}"
         for k in sorted(set(flat) & set(expected))
         if tuple(flat[k].shape) != tuple(expected[k].shape)]
  if bad:
    problems.append(f"shape mismatches ({len(bad)}): {bad[:6]}")
  tests = [p if callable(p) else re.compile(p).fullmatch for p in ignore]
  unused = sorted(k for k in state if k not in used and not any(t(k) for t in tests))
  if unused:
    problems.append(f"{len(unused)} checkpoint keys not used by the model: {unused[:8]}")
  if problems:
    raise ConversionError(f"cannot load {source} into {model}: " + "; ".join(problems))
  return unflatten_tree(flat)
