"""A detector's whole scoring function as a serialized `jax.export` program, runnable where
adjax is not installed (`adjax fit --export-program`; docs/detector.md).

The program takes a fixed-size batch of preprocessed images (B, S, S, 3) uint8 (the centre
crop `predict` makes) and returns (image scores (B,), maps (B, S, S)): normalisation, backbone,
residual against the detector's references, projector, the method's scoring. Its weights are
arguments, stored beside it in an .npz in the order program.json lists them:

    import json, jax, numpy as np
    info = json.load(open("program/program.json"))
    program = jax.export.deserialize(open("program/program.jaxexport", "rb").read())
    weights = np.load("program/weights.npz")
    scores, maps = program.call(*[weights[k] for k in info["weights"]], images)
"""

from __future__ import annotations

import io
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adjax.detector import state_io
from adjax.errors import UserError

PROGRAM_DIR = "program"
PROGRAM_FILE = "program.jaxexport"
WEIGHTS_FILE = "weights.npz"
INFO_FILE = "program.json"


def _flat(tree: Any, prefix: str) -> dict[str, np.ndarray]:
  from adjax import run_layout
  return {f"{prefix}/{k}": v for k, v in run_layout.flatten_params(tree).items()}


def _unflat(flat: dict[str, Any], prefix: str) -> Any:
  from adjax import run_layout
  start = len(prefix) + 1
  return run_layout.unflatten_params({k[start:]: v for k, v in flat.items()
                                      if k.startswith(prefix + "/")})


def export_program(detector, *, batch: int = 8, platforms: tuple[str, ...] = ("cpu",)
                   ) -> dict[str, bytes]:
  """The program's files {name: bytes} for a detector folder's program/ subfolder.

  Raises:
    UserError: a batch below 1, or a method whose scoring does not trace (CFLOW's runs on the
      host in float64).
  """
  from adjax.models.projector import project
  from adjax.residual import residual_features
  if batch < 1:
    raise UserError(f"--program-batch must be at least 1, got {batch}")
  m = detector.manifest
  size = int(m["image_size"])
  dtype = jnp.dtype(m["dtype"])
  skeleton, state_arrays = state_io.to_arrays(detector.state)
  weights = {**_flat(detector.backbone_params, "backbone"),
             **{f"state/{k}": np.asarray(v) for k, v in state_arrays.items()}}
  if detector.references is not None:
    weights.update({f"references/{i}": np.asarray(r) for i, r in enumerate(detector.references)})
  if detector.projector is not None:
    weights.update(_flat(detector.projector, "projector"))
  names = sorted(weights)
  method, backbone, kind = detector.method, detector.backbone, m["features"]

  def score(*args):
    *leaves, images = args
    w = dict(zip(names, leaves))
    levels = backbone.extract(_unflat(w, "backbone"), images.astype(jnp.float32) / 255.0,
                              dtype)
    if kind != "original":
      refs = [w[f"references/{i}"] for i in range(len(detector.references))]
      levels = [residual_features(x, r, max_similarities=int(m["max_similarities"]))[0]
                for x, r in zip(levels, refs)]
    if kind == "pretrained":
      levels = project(_unflat(w, "projector"), levels, num_heads=int(m["num_heads"]),
                       dtype=dtype)
    state = state_io.from_arrays(skeleton, {k[len("state/"):]: v for k, v in w.items()
                                            if k.startswith("state/")})
    scores, maps = method.score(state, levels, size)
    return jnp.asarray(scores, jnp.float32), jnp.asarray(maps, jnp.float32)

  specs = [jax.ShapeDtypeStruct(weights[k].shape, weights[k].dtype) for k in names]
  specs.append(jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8))
  try:
    exported = jax.export.export(jax.jit(score), platforms=platforms)(*specs)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerBoolConversionError) as err:
    raise UserError(f"--export-program: {m['method']}'s scoring runs partly on the host and "
                    f"cannot be exported ({type(err).__name__})") from err
  buf = io.BytesIO()
  np.savez(buf, **weights)
  import json
  info = {"weights": names, "batch": batch, "image_size": size, "platforms": list(platforms),
          "input": f"({batch}, {size}, {size}, 3) uint8: preprocessed images",
          "outputs": ["image scores (B,) float32", f"maps (B, {size}, {size}) float32"]}
  return {PROGRAM_FILE: bytes(exported.serialize()), WEIGHTS_FILE: buf.getvalue(),
          INFO_FILE: json.dumps(info, indent=1).encode()}
