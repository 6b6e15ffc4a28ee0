"""Projector weights to and from the PyTorch reference: `adjax export` and `adjax import`.

Export writes the reference's checkpoint form, `{"projectors": state_dict}`, which its code
loads with `load_state_dict(strict=True)`: as a `.pth` (with torch when it is installed, else
with our own writer of PyTorch's zip format, which needs numpy only) or as a `.safetensors`
with the same keys and the run's metadata (backbone, levels, dims, step, metrics).

Import turns such a file (e.g. a released `checkpoints_pro_angle.pth`) into an adjax run dir
(`adjax.run_layout`): config.json with the backbone and the projector's shape, and
best/<kind>/params.npz, which `adjax evaluate --workdir RUN` uses.

Every file is written atomically: a temporary file in the same folder, then os.replace.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from adjax import run_layout
from adjax.checkpointing import read_run_params
from adjax.errors import UserError
from adjax.io import files
from adjax.io import pth_writer
from adjax.io.safetensors import SafetensorsError
from adjax.io.weights import CheckpointError, read_weights_file

Params = dict[str, Any]
_FORMAT = "adjax-projector"


def projector_settings(params: Params) -> dict[str, Any]:
  """Shape settings read from projector params: levels, dims, num_ref_tokens, depth."""
  if "params" in params and len(params) == 1:
    params = params["params"]
  names = sorted(params, key=lambda n: int(re.match(r"l(\d+)_proj", n).group(1))
                 if re.match(r"l(\d+)_proj$", n) else 1 << 30)
  bad = [n for n in names if not re.match(r"l\d+_proj$", n)]
  if bad:
    raise UserError(f"not projector params: unexpected top-level names {bad[:5]}")
  dims, refs, depths = [], [], []
  for name in names:
    x_ref = np.shape(params[name]["x_ref"])
    refs.append(int(x_ref[0]))
    dims.append(int(x_ref[1]))
    depths.append(sum(1 for k in params[name] if k.startswith("layers_")))
  if len(set(refs)) != 1 or len(set(depths)) != 1:
    raise UserError(f"projector levels disagree: reference tokens {refs}, depths {depths}")
  return {"levels": len(names), "dims": dims, "num_ref_tokens": refs[0], "depth": depths[0]}


# ----------------------------------------------------------------------------- export
def _run_config(workdir: str) -> dict:
  path = run_layout.config_path(workdir)
  data = files.read_json(path) if os.path.isfile(path) else {}
  return data if isinstance(data, dict) else {}


def _features_of(config: Mapping) -> dict[str, Any]:
  """What a projector's input features depend on beyond its shapes: the backbone, the blocks it
  taps and the image size (a projector trained on blocks 3/6/9/12 is wrong on 2/5/8/11, and
  the dims cannot tell them apart). From a run's config.json (or a ConfigDict as a dict)."""
  backbone = config.get("backbone", {})
  backbone = backbone if isinstance(backbone, Mapping) else {"name": backbone}
  taps = backbone.get("taps")
  image_size = config.get("image_size")
  return {"backbone": str(backbone.get("name", "") or ""),
          "taps": [int(t) for t in taps] if taps else None,
          "image_size": int(image_size) if image_size else None}


def _run_attention(workdir: str) -> dict | None:
  """The attention the run trained with (run_layout.attention_path), or None for older runs."""
  path = run_layout.attention_path(workdir)
  data = files.read_json(path) if os.path.isfile(path) else None
  return data if isinstance(data, dict) else None


def _run_num_heads(config: Mapping) -> int | None:
  try:
    return int(config["projector"]["num_heads"])
  except (KeyError, TypeError, ValueError):
    return None


def export_projector(workdir: str, out: str, *, which: str = "angle",
                     use_torch: bool | None = None) -> dict[str, Any]:
  """Exports a run's projector for the PyTorch reference.

  Args:
    workdir: the run.
    out: destination, `.pth` (`{"projectors": state_dict}`) or `.safetensors` (the same keys,
      plus metadata).
    which: angle | norm | latest (see `read_run_params`).
    use_torch: for .pth: True torch.save, False our own writer, None torch if installed.

  Returns:
    A summary: out, which, backbone, taps, image_size, levels, dims, num_ref_tokens, depth,
    num_heads, step, metrics, keys. A .safetensors file carries all of it as metadata (what
    `import` reads back); a .pth file is the reference's `{"projectors": ...}` only.

  Raises:
    UserError: bad destination (also one that is not a regular file: a device, a folder, a
      FIFO, or a symlink to one), missing run or params.
  """
  # Before the run is read: /dev/null, a folder or a FIFO is refused, never replaced.
  files.check_regular_target(out)
  ext = os.path.splitext(out)[1].lower()
  if ext not in (".pth", ".pt", ".safetensors"):
    raise UserError(f"--out must end in .pth or .safetensors, got {out!r}")
  params, meta = read_run_params(workdir, which)
  from adjax.models.projector_torch import projector_to_torch
  state_dict = projector_to_torch(params)
  settings = projector_settings(params)
  run_config = _run_config(workdir)
  summary = {"out": os.path.abspath(out), "which": which, **_features_of(run_config),
             **settings, "num_heads": _run_num_heads(run_config),
             "step": meta.get("step"), "metrics": meta.get("metrics", {}),
             "keys": len(state_dict), "attention": _run_attention(workdir)}
  if ext == ".safetensors":
    from adjax.io.safetensors import save_safetensors
    metadata = {"format": _FORMAT, "backbone": summary["backbone"], "which": which}
    for key in ("taps", "image_size", "levels", "dims", "num_ref_tokens", "depth", "num_heads",
                "step", "metrics", "attention"):
      metadata[key] = json.dumps(summary[key], default=_json_number)
    save_safetensors(out, state_dict, metadata)
  else:
    pth_writer.write_pth(out, {"projectors": state_dict}, use_torch=use_torch)
  return summary


def _json_number(value: Any) -> Any:
  if hasattr(value, "tolist"):
    return value.tolist()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ----------------------------------------------------------------------------- import
def infer_kind(path: str) -> str | None:
  """"angle" / "norm" from a released checkpoint's name (`*_angle*`, `*_norm*`), else None."""
  name = os.path.basename(path).lower()
  found = [kind for kind in run_layout.KINDS if re.search(rf"(^|[_\-.]){kind}([_\-.]|$)", name)]
  return found[0] if len(found) == 1 else None


def _is_count(value: Any, low: int, high: int) -> bool:
  return type(value) is int and low <= value <= high  # not bool, not 3.0, not inf


def _shallow(value: Any, levels: int) -> bool:
  """Whether a parsed JSON value nests at most `levels` containers deep (metrics are copied
  into meta.json, and a deep one would fail there, after the run folder was made)."""
  if isinstance(value, (dict, list)):
    children = value.values() if isinstance(value, dict) else value
    return levels > 0 and all(_shallow(c, levels - 1) for c in children)
  return True


# key -> (what it must be, check of the parsed JSON value). The values are JSON texts (as
# export_projector writes them); they come from the file, so they are checked before use.
_METADATA_CHECKS: dict[str, tuple[str, Any]] = {
    "num_heads": ("an integer from 1 to 4096", lambda v: _is_count(v, 1, 4096)),
    "image_size": ("an integer from 1 to 65536", lambda v: _is_count(v, 1, 65536)),
    "taps": ("a list of at most 64 block indices (integers from 0 to 4096)",
             lambda v: isinstance(v, list) and len(v) <= 64
             and all(_is_count(t, 0, 4096) for t in v)),
    "step": ("an integer >= 0", lambda v: _is_count(v, 0, 1 << 62)),
    "metrics": ("a JSON object nested at most 4 deep",
                lambda v: isinstance(v, dict) and _shallow(v, 4)),
}


def _export_metadata(path: str, metadata: Mapping[str, str]) -> dict[str, Any]:
  """The settings an adjax export records in a safetensors file's metadata, parsed and checked.

  Done before anything is written, so a file with a bad value leaves no half-made run folder.

  Returns:
    {key: parsed value} for the keys of `_METADATA_CHECKS` present (absent, empty or "null"
    ones are left out), plus "backbone" and "which" as strings when given.

  Raises:
    UserError: a value that is not valid JSON or not of its key's kind, naming file and key.
  """
  out: dict[str, Any] = {}
  for key in ("backbone", "which"):
    if metadata.get(key):
      out[key] = metadata[key]
  for key, (expected, check) in _METADATA_CHECKS.items():
    text = metadata.get(key)
    if text in (None, "", "null"):
      continue
    try:
      value = json.loads(text)
      ok = check(value)
    except (ValueError, RecursionError):
      ok = False
    if not ok:
      raise UserError(f"{path}: metadata key {key!r} is {text[:60]!r}, not {expected}; the file "
                      "was not written by `adjax export` or was altered")
    out[key] = value
  return out


def _backbone_dims(name: str, taps: Any) -> tuple[int, ...]:
  from adjax.models.backbones import get_backbone
  overrides = {"taps": tuple(taps)} if taps else {}
  return tuple(int(d) for d in get_backbone(name, **overrides).level_dims)


def import_projector(path: str, out: str, *, backbone: str | None = None,
                     which: str | None = None, config: Any = None,
                     overrides: Sequence[tuple[str, Any]] = (),
                     check_backbone: bool = True) -> dict[str, Any]:
  """Makes an adjax run dir from a projector checkpoint of the reference (or of `export`).

  Args:
    path: `.pth` (e.g. the released `checkpoints_pro_angle.pth`), `.safetensors` or `.npz`.
    out: the run dir to write (created; an existing run of the same backbone and projector
      shape gets the other kind added).
    backbone: the backbone the projector was trained on (one of the registry's names);
      None: from the file's metadata.
    which: "angle", "norm" or "both" (the same params as both); None: from the file name.
    config: the base config (ConfigDict); None: `adjax.configs.default_config()`.
    overrides: `(dotted key, value)` config overrides, applied after what the file tells
      (backbone, projector shape, and the head count an adjax export records).
    check_backbone: check that the projector's dims are the backbone's level dims.

  Returns:
    A summary: out, kinds, backbone, levels, dims, num_ref_tokens, depth, step, source.

  Raises:
    UserError / ValueError: unreadable file, not a projector, unknown kind or backbone,
      dims that do not match the backbone, or an existing run that differs.
  """
  try:
    raw, file_metadata = read_weights_file(path)
  except (CheckpointError, SafetensorsError) as err:
    raise UserError(files.one_line(err)) from err
  metadata = _export_metadata(path, file_metadata)
  from adjax.models.projector_torch import projector_from_torch
  try:
    params = projector_from_torch(raw)
  except ValueError as err:
    raise UserError(f"{path}: not a projector checkpoint: {files.one_line(err)}") from err
  settings = projector_settings(params)
  backbone = backbone or metadata.get("backbone") or None
  if not backbone:
    raise UserError(f"{path}: the file does not name its backbone; pass --backbone NAME")
  kind = which or infer_kind(path)
  if kind is None and metadata.get("which") in run_layout.KINDS:  # an adjax export
    kind = metadata["which"]
  if kind is None:
    raise UserError(f"cannot tell from the name {os.path.basename(path)!r} whether this is the "
                    "angle (PatchCore-selected) or norm (FeatureNorm-selected) checkpoint; pass "
                    "--which angle, norm or both")
  if kind not in (*run_layout.KINDS, "both"):
    raise UserError(f"--which must be angle, norm or both for import, got {kind!r}")
  kinds = list(run_layout.KINDS) if kind == "both" else [kind]

  if config is None:
    from adjax.configs import default_config
    config = default_config()
  config.backbone.name = backbone
  config.projector.num_ref_tokens = settings["num_ref_tokens"]
  config.projector.depth = settings["depth"]
  # What the shapes cannot tell, as an adjax export records it.
  if "num_heads" in metadata:
    config.projector.num_heads = metadata["num_heads"]
  if "taps" in metadata:
    config.backbone.taps = tuple(metadata["taps"])
  if "image_size" in metadata:
    config.image_size = metadata["image_size"]
  from adjax.configs import loading as config_loading
  config_loading.apply_overrides(config, overrides)
  from adjax.configs.validation import validate_config
  validate_config(config, training=False)
  got = (config.backbone.name, config.projector.num_ref_tokens, config.projector.depth)
  if got[1:] != (settings["num_ref_tokens"], settings["depth"]):
    raise UserError(f"the overrides set the projector to {got[1]} reference tokens and depth "
                    f"{got[2]}, but {path} holds {settings['num_ref_tokens']} and "
                    f"{settings['depth']}")
  backbone = got[0]
  heads = int(config.projector.num_heads)
  if any(d % heads for d in settings["dims"]):
    raise UserError(f"projector.num_heads={heads} does not divide the level dims "
                    f"{settings['dims']}; set --config.projector.num_heads")
  if check_backbone:
    dims = _backbone_dims(backbone, config.backbone.get("taps"))
    if tuple(settings["dims"]) != dims:
      raise UserError(f"{path}: the projector's level dims {tuple(settings['dims'])} are not "
                      f"those of backbone {backbone!r} {dims}; pick the backbone it was "
                      "trained on")

  existing = run_layout.config_path(out)
  if os.path.isfile(existing):
    # The run's other kind was imported with this config; rewriting it with a different head
    # count, taps or image size would silently change how those params are applied.
    def described(c: Mapping) -> dict[str, Any]:
      projector = c.get("projector", {}) if isinstance(c.get("projector"), Mapping) else {}
      return {**_features_of(c), "depth": projector.get("depth"),
              "num_ref_tokens": projector.get("num_ref_tokens"),
              "num_heads": projector.get("num_heads")}
    old, new = described(_run_config(out)), described(config.to_dict())
    differ = {k: (old[k], new[k]) for k in old if old[k] != new[k]}
    if differ:
      raise UserError(f"{out} already holds a run that differs in "
                      + ", ".join(f"{k} ({a} there, {b} here)" for k, (a, b) in differ.items())
                      + "; import into a new --out folder")
  run_layout.save_config(out, config)
  meta = {"step": metadata.get("step"), "metrics": metadata.get("metrics", {}),
          "imported_from": os.path.abspath(path), "backbone": backbone}
  for k in kinds:
    run_layout.save_best(out, k, params, {**meta, "kind": k})
  return {"out": os.path.abspath(out), "kinds": kinds, "backbone": backbone, **settings,
          "step": meta["step"], "source": os.path.abspath(path)}
