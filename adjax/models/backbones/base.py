"""The frozen-backbone object every family returns: init, load (with a cache), extract.

A ``Backbone`` wraps a Flax module that maps normalised images (B, S, S, 3) to a list of
feature levels (B, h, w, C), the normalisation constants, and the function that converts a
PyTorch state dict into the module's params. It never trains: BatchNorm uses running
statistics and there is no dropout.

Converted weights are cached as a flat ``.safetensors`` file of the Flax params, keyed by the
source file's path, size, inode, modification and change times and by the backbone's
configuration, so that a checkpoint is converted once.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adjax.io import mapping
from adjax.io import safetensors as safetensors_io
from adjax.io.weights import read_state_dict

Params = dict[str, Any]
Features = list[jax.Array]
StateDict = dict[str, np.ndarray]

log = logging.getLogger("adjax.backbones")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Bump when the converted layout changes, so stale cache files are not reused.
_CACHE_FORMAT = 1


def default_cache_dir() -> str:
  """Where converted weights go when ``load`` gets no ``cache_dir``.

  Returns:
    ``$ADJAX_CACHE_DIR`` if set, else ``~/.cache/adjax/backbones``.
  """
  return os.environ.get("ADJAX_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "adjax", "backbones")


@dataclasses.dataclass(eq=False)
class Backbone:
  """A frozen feature extractor.

  Attributes:
    name: registry name.
    module: Flax module; ``module.apply({'params': p}, x)`` maps normalised (B, S, S, 3) images
      to the list of tapped levels. It has a ``dtype`` field (compute dtype).
    input_size: nominal square input size in pixels.
    mean: per-channel RGB mean used by ``extract``.
    std: per-channel RGB std used by ``extract``.
    level_dims: channels of each tapped level.
    level_strides: pixel stride of each tapped level.
    convert: ``(state_dict, template, source) -> params`` (raises ``ConversionError``).
    config: the configuration (for the cache key and for display).
    fixed_size: if True, ``extract`` only accepts ``input_size`` (fixed position tables).
    size_multiple: the input side must be a multiple of this (the patch size of a ViT).
    init_kwargs: extra keyword arguments of ``module.init`` (e.g. to create a classifier head).
  """
  name: str
  module: nn.Module
  input_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  level_dims: tuple[int, ...]
  level_strides: tuple[int, ...]
  convert: Callable[[StateDict, Mapping[str, Any], str], Params]
  config: dict[str, Any]
  fixed_size: bool = False
  size_multiple: int = 1
  init_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self._jitted: dict[str, Callable] = {}
    self._template: Params | None = None

  # ------------------------------------------------------------------- parameters
  def _dummy(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, self.input_size, self.input_size, 3), jnp.float32)

  def param_shapes(self) -> Params:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    if self._template is None:
      init = functools.partial(self.module.init, **self.init_kwargs)
      shapes = jax.eval_shape(init, jax.random.key(0), self._dummy())
      self._template = shapes["params"]
    return self._template

  def init(self, rng: jax.Array) -> Params:
    """Random parameters of the right tree (tests and benchmarks).

    Leaves are drawn with numpy from a seed taken from ``rng``, by their role: kernels
    N(0, 1/fan_in), biases and running means 0, norm scales and running variances 1, class
    token and position table N(0, 0.02^2), LayerScale 0.1. (Running the module's own Flax
    initialisers would compile a forward pass and one random generator per leaf: tens of
    seconds on a CPU for no benefit.)

    Args:
      rng: a PRNG key.

    Returns:
      The params tree (float32 jax arrays).
    """
    data = np.asarray(jax.random.key_data(rng)).ravel()
    gen = np.random.default_rng([int(v) for v in data])
    flat = {}
    for path, leaf in mapping.flatten_tree(self.param_shapes()).items():
      flat[path] = jnp.asarray(_random_leaf(path, tuple(leaf.shape), gen))
    return mapping.unflatten_tree(flat)

  def cache_key(self, path: str) -> str:
    """Hex key of (file identity, backbone configuration, cache format)."""
    st = os.stat(path)
    # Size and mtime alone miss a same-size replacement whose mtime was kept (cp -p, rsync -t,
    # tar x); a new inode or a changed ctime (which utime cannot set back) catches it.
    ident = {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "ino": st.st_ino, "ctime_ns": st.st_ctime_ns,
             "name": self.name, "config": self.config, "format": _CACHE_FORMAT}
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]

  def load(self, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
           cache: bool = True) -> Params:
    """Convert a checkpoint file into params, once; later calls read the cached conversion.

    Args:
      path: ``.pth``/``.pt``/``.safetensors`` weights (official or Hugging Face key names).
      cache_dir: folder for converted weights (default: ``default_cache_dir()``).
      cache: set False to neither read nor write the cache.

    Returns:
      The params tree (float32 jax arrays).

    Raises:
      FileNotFoundError: no such file.
      CheckpointError / SafetensorsError: unreadable or unsafe file.
      ConversionError: the file does not match this backbone (missing/unused keys, shapes).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{self.name}: weights file not found: {path}")
    template = self.param_shapes()
    cache_file = None
    if cache:
      folder = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
      cache_file = os.path.join(folder, f"{self.name}-{self.cache_key(path)}.safetensors")
      if os.path.isfile(cache_file):
        try:
          flat = safetensors_io.load_safetensors(cache_file)
          params = mapping.unflatten_tree(flat)
          if _same_shapes(params, template):
            return jax.tree.map(jnp.asarray, params)
        except (ValueError, OSError):
          pass  # unreadable cache: convert again and overwrite it
    state = read_state_dict(path)
    params = self.convert(state, template, path)
    if cache_file is not None:
      try:
        safetensors_io.save_safetensors(
            cache_file, mapping.flatten_tree(params),
            metadata={"source": os.path.realpath(path), "backbone": self.name})
      except OSError as e:
        # The conversion succeeded; an unwritable cache (read-only home, full disk) only means
        # the next load converts again, so it must not lose these params.
        log.warning("%s: cannot write the converted-weights cache %s (%s); the weights are "
                    "converted again on the next load (set ADJAX_CACHE_DIR or cache_dir to a "
                    "writable folder)", self.name, cache_file, e)
    return jax.tree.map(jnp.asarray, params)

  # ------------------------------------------------------------------- features
  def check_images(self, images: Any) -> None:
    """Raise a clear ValueError unless ``images`` is (B, S, S, 3) with a valid S."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[-1] != 3:
      raise ValueError(f"{self.name}: images must be (B, S, S, 3) RGB in [0, 1], got shape "
                       f"{shape}")
    if shape[1] != shape[2]:
      raise ValueError(f"{self.name}: images must be square, got {shape[1]} x {shape[2]}")
    if self.fixed_size and shape[1] != self.input_size:
      raise ValueError(f"{self.name}: this backbone's position table fixes the input at "
                       f"{self.input_size} px, got {shape[1]} px")
    if shape[1] % self.size_multiple:
      raise ValueError(f"{self.name}: the image side must be a multiple of the patch size "
                       f"{self.size_multiple}, got {shape[1]}")

  def _make_extract(self, dtype: Any) -> Callable:
    module = self.module.clone(dtype=dtype)
    # numpy constants: this may first run inside a caller's trace (the train step), where jnp
    # values would be that trace's tracers, cached here and leaked into later calls.
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)

    def fn(params, images):
      x = ((images.astype(jnp.float32) - mean) / std).astype(dtype)
      levels = module.apply({"params": params}, x)
      return [lv.astype(jnp.float32) for lv in levels]

    return jax.jit(fn)

  def extract(self, params: Params, images: jax.Array, dtype: Any = jnp.float32) -> Features:
    """Feature levels of a batch of images (jit-compiled once per dtype and shape).

    Args:
      params: from ``init`` or ``load``.
      images: (B, S, S, 3) float RGB in [0, 1], not normalised (this normalises).
      dtype: compute dtype, ``jnp.float32`` or ``jnp.bfloat16``.

    Returns:
      One (B, h, w, C) float32 array per tapped level.
    """
    self.check_images(images)
    key = jnp.dtype(dtype).name
    if key not in self._jitted:
      self._jitted[key] = self._make_extract(jnp.dtype(dtype))
    return self._jitted[key](params, images)

  def __repr__(self) -> str:
    return (f"Backbone({self.name!r}, input_size={self.input_size}, "
            f"level_dims={self.level_dims}, level_strides={self.level_strides})")


def _random_leaf(path: str, shape: tuple[int, ...], gen: np.random.Generator) -> np.ndarray:
  """A random value for one parameter, chosen by its name (see ``Backbone.init``)."""
  leaf = path.rsplit("/", 1)[-1]
  if leaf == "kernel":
    fan_in = int(np.prod(shape[:-1])) or 1
    return (gen.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
  if leaf in ("scale", "var"):
    return np.ones(shape, np.float32)
  if leaf in ("bias", "mean"):
    return np.zeros(shape, np.float32)
  if leaf in ("ls1", "ls2"):
    return np.full(shape, 0.1, np.float32)
  return (0.02 * gen.standard_normal(shape)).astype(np.float32)


def _same_shapes(params: Mapping[str, Any], template: Mapping[str, Any]) -> bool:
  a = {k: tuple(v.shape) for k, v in mapping.flatten_tree(params).items()}
  b = {k: tuple(v.shape) for k, v in mapping.flatten_tree(template).items()}
  return a == b


def check_overrides(name: str, overrides: Mapping[str, Any], known: Sequence[str]) -> None:
  """Raise a ValueError naming unknown configuration keys (a typo must not pass silently)."""
  unknown = sorted(set(overrides) - set(known))
  if unknown:
    raise ValueError(f"{name}: unknown options {unknown}; known options: {sorted(known)}")


def taps_to_levels(taps: Sequence[int], depth: int, name: str) -> tuple[int, ...]:
  """Validate 1-based block taps (every backbone numbers its blocks from 1).

  Args:
    taps: blocks whose outputs are returned (1-based, increasing).
    depth: number of blocks.
    name: backbone name for messages.

  Returns:
    The taps as a tuple.
  """
  taps = tuple(int(t) for t in taps)
  if not taps or any(t < 1 or t > depth for t in taps) or list(taps) != sorted(set(taps)):
    raise ValueError(f"{name}: taps must be increasing 1-based block numbers in [1, {depth}], "
                     f"got {taps}")
  return taps
