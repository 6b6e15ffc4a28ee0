"""A detector folder on disk (docs/detector.md): safetensors arrays and a JSON manifest that
lists every file with its SHA-256; no pickle anywhere.

  <detector>/manifest.json          settings, thresholds, validation statistics, file digests
  <detector>/state.safetensors      the method's fitted state (structure in the manifest)
  <detector>/references.safetensors reference tokens per level (residual, pretrained kinds)
  <detector>/projector.safetensors  the projector (pretrained kind)
  <detector>/program/               optional: the scoring function as a jax.export program

The folder is written under a hidden temporary name beside the target and renamed into place
(a folder replaced as a whole), so a crash never leaves a folder that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from adjax.detector import state_io
from adjax.detector.format import FORMAT, FORMAT_VERSION
from adjax.errors import UserError
from adjax.io import files

MANIFEST = "manifest.json"
STATE_FILE = "state.safetensors"
REFERENCES_FILE = "references.safetensors"
PROJECTOR_FILE = "projector.safetensors"
PROGRAM_DIR = "program"                # the exported scoring program (adjax/detector/program.py)


def _is_detector(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MANIFEST))


def save_detector(detector, path: str) -> str:
  """Writes `detector` to the folder `path` (replacing an earlier detector there).

  Raises:
    UserError: `path` is a file, or a folder that holds something other than a detector.
  """
  from adjax import run_layout
  from adjax.io.safetensors import save_safetensors
  path = os.path.abspath(path)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise UserError(f"--out {path} is a file; a detector is a folder")
  if os.path.isdir(path) and os.listdir(path) and not _is_detector(path):
    raise UserError(f"--out {path} is a folder that holds something other than a detector; "
                    "give a new or empty folder")
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.partial-")
  try:
    os.chmod(tmp, 0o777 & ~_umask())
    skeleton, arrays = state_io.to_arrays(detector.state)
    written = {}
    if arrays:
      save_safetensors(os.path.join(tmp, STATE_FILE), arrays)
      written[STATE_FILE] = None
    if detector.references is not None:
      save_safetensors(os.path.join(tmp, REFERENCES_FILE),
                       {f"level_{i}": np.asarray(r) for i, r in enumerate(detector.references)})
      written[REFERENCES_FILE] = None
    if detector.projector is not None:
      save_safetensors(os.path.join(tmp, PROJECTOR_FILE),
                       run_layout.flatten_params(detector.projector))
      written[PROJECTOR_FILE] = None
    if detector.program:
      os.makedirs(os.path.join(tmp, PROGRAM_DIR))
      for file_name, data in detector.program.items():
        rel = f"{PROGRAM_DIR}/{file_name}"
        with open(os.path.join(tmp, rel), "wb") as f:
          f.write(data)
        written[rel] = None
    manifest = dict(detector.manifest)
    manifest["state"] = skeleton
    manifest["files"] = {f: files.file_sha256(os.path.join(tmp, f)) for f in written}
    files.write_json(os.path.join(tmp, MANIFEST), manifest)   # last: the folder is complete
    if os.path.isdir(path):
      old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
      os.rmdir(old)
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  detector.manifest = manifest
  return path


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def read_manifest(path: str) -> dict:
  """The manifest of the detector folder `path`, checked for its format.

  Raises:
    UserError: not a detector folder, or another format or version.
  """
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isdir(path):
    raise UserError(f"--detector {path}: no such detector folder")
  if not os.path.isfile(manifest_path):
    raise UserError(f"{manifest_path}: missing; {path} is not a detector folder (or an "
                    "incomplete one)")
  try:
    manifest = files.read_json(manifest_path)
  except ValueError as err:
    raise UserError(f"{manifest_path}: not a readable manifest ({files.one_line(err)})") from err
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise UserError(f"{manifest_path}: not an adjax detector manifest")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise UserError(f"{manifest_path}: detector format version "
                    f"{manifest.get('format_version')!r}; this adjax reads {FORMAT_VERSION}")
  for key in ("method", "method_settings", "features", "backbone", "image_size", "thresholds",
              "validation", "state", "files"):
    if key not in manifest:
      raise UserError(f"{manifest_path}: has no {key!r} entry")
  return manifest


def _checked_file(path: str, name: str, manifest: dict) -> str:
  file_path = os.path.join(path, name)
  if not os.path.isfile(file_path):
    raise UserError(f"{file_path}: missing from the detector folder")
  digest = files.file_sha256(file_path)
  if digest != manifest["files"][name]:
    raise UserError(f"{file_path}: its SHA-256 {digest} differs from the manifest's "
                    f"{manifest['files'][name]} (the file was changed or damaged)")
  return file_path


def _load_arrays(path: str, name: str, manifest: dict) -> dict[str, np.ndarray]:
  from adjax.io.safetensors import load_safetensors
  file_path = _checked_file(path, name, manifest)
  try:
    return load_safetensors(file_path)
  except ValueError as err:
    raise UserError(f"{file_path}: {files.one_line(err)}") from err


def backbone_weights(manifest: dict, weights: Optional[str]) -> Optional[str]:
  """The weights file to build the backbone from, its digest checked against the manifest's.

  Raises:
    UserError: the file is missing, or its SHA-256 differs (both digests named).
  """
  recorded = manifest["backbone"].get("weights")
  if recorded is None:
    if weights:
      raise UserError(f"--weights {weights}: this detector's backbone "
                      f"{manifest['backbone']['name']!r} uses no weights file")
    return None
  path = weights or recorded["path"]
  if not os.path.isfile(path):
    raise UserError(f"backbone weights {path} ({recorded['name']}, SHA-256 "
                    f"{recorded['sha256']}) not found; pass the same file with --weights PATH")
  digest = files.file_sha256(path)
  if digest != recorded["sha256"]:
    raise UserError(f"backbone weights {path}: SHA-256 {digest} differs from the detector's "
                    f"{recorded['sha256']} ({recorded['name']}); these are other weights")
  return path


def load_detector(cls, path: str, *, weights: Optional[str] = None):
  """See Detector.load."""
  from adjax import run_layout
  from adjax.configs import default_config
  from adjax.from_config import build_backbone
  manifest = read_manifest(path)
  for name in manifest["files"]:
    if name not in (STATE_FILE, REFERENCES_FILE, PROJECTOR_FILE) and not (
        name.startswith(PROGRAM_DIR + "/") and "/" not in name[len(PROGRAM_DIR) + 1:]):
      raise UserError(f"{os.path.join(path, MANIFEST)}: lists an unknown file {name!r}")
    if name.startswith(PROGRAM_DIR + "/"):
      _checked_file(path, name, manifest)   # not read here, but refused when changed
  arrays = _load_arrays(path, STATE_FILE, manifest) if STATE_FILE in manifest["files"] else {}
  try:
    state = state_io.from_arrays(manifest["state"], {k: jnp.asarray(v) for k, v in
                                                     arrays.items()})
  except ValueError as err:
    raise UserError(f"{os.path.join(path, MANIFEST)}: {err}") from err
  references = projector = None
  kind = manifest["features"]
  if kind in ("residual", "pretrained"):
    if REFERENCES_FILE not in manifest["files"]:
      raise UserError(f"{path}: {kind} features need {REFERENCES_FILE}, which is not listed")
    refs = _load_arrays(path, REFERENCES_FILE, manifest)
    references = [np.asarray(refs[f"level_{i}"]) for i in range(len(refs))]
  if kind == "pretrained":
    if PROJECTOR_FILE not in manifest["files"]:
      raise UserError(f"{path}: pretrained features need {PROJECTOR_FILE}, which is not listed")
    flat = _load_arrays(path, PROJECTOR_FILE, manifest)
    projector = _as_jax(run_layout.unflatten_params(flat))
  config = default_config()
  backbone = manifest["backbone"]
  config.backbone.name = backbone["name"]
  if backbone.get("taps"):
    config.backbone.taps = tuple(backbone["taps"])
  config.backbone.weights = backbone_weights(manifest, weights) or ""
  config.seed = int(backbone.get("seed", 0))
  model, params = build_backbone(config)
  return cls(manifest=manifest, state=state, references=references, projector=projector,
             backbone=model, backbone_params=params)


def _as_jax(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _as_jax(v) for k, v in tree.items()}
  return jnp.asarray(tree)
