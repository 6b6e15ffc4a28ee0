"""The layout of a run's workdir, shared by the trainer, the evaluator, export/import and sweeps.

  <workdir>/config.json            the run's config (ConfigDict as JSON)
  <workdir>/checkpoints/           orbax CheckpointManager steps (the latest N)
  <workdir>/checkpoints_corrupt/   steps a resume could not restore, moved aside (never deleted)
  <workdir>/best/angle/params.npz  projector params selected by PatchCore ("*_angle")
  <workdir>/best/angle/meta.json   {"step": ..., "metrics": {...}, ...}
  <workdir>/best/norm/...          the same, selected by FeatureNorm ("*_norm")
  <workdir>/centers.npz            per-level centres c_k
  <workdir>/metrics.jsonl          one JSON object per logged step
  <workdir>/results.json           a finished run's (or sweep point's) results
  <workdir>/attention.json         the projector attention resolved at the start (pretrain)
  <workdir>/unreadable.json        the image check of the pretraining records: which were
                                   unreadable (and dropped), keyed by the files it checked
  <workdir>/DONE                   written last by a sweep when the point finished

Params are stored flattened: `path/with/slashes -> array` in an .npz, so that reading them
needs numpy only. Every writer here is atomic (a temporary file in the same folder, then
os.replace), so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Mapping

import numpy as np

from adjax.errors import UserError
from adjax.io import files

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
CORRUPT_CHECKPOINTS_DIR = "checkpoints_corrupt"
BEST_DIR = "best"
PARAMS_FILE = "params.npz"
META_FILE = "meta.json"
CENTERS_FILE = "centers.npz"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
DONE_FILE = "DONE"
ATTENTION_FILE = "attention.json"   # the projector attention the run resolved at its start
UNREADABLE_FILE = "unreadable.json"   # the pretraining image check (adjax/pretrain/image_check)
KINDS = ("angle", "norm")

Params = dict[str, Any]


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS_DIR)


def corrupt_checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, CORRUPT_CHECKPOINTS_DIR)


def best_dir(workdir: str, kind: str) -> str:
  """`<workdir>/best/<kind>`, kind one of KINDS."""
  if kind not in KINDS:
    raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
  return os.path.join(workdir, BEST_DIR, kind)


def best_params_path(workdir: str, kind: str) -> str:
  return os.path.join(best_dir(workdir, kind), PARAMS_FILE)


def best_meta_path(workdir: str, kind: str) -> str:
  return os.path.join(best_dir(workdir, kind), META_FILE)


def centers_path(workdir: str) -> str:
  return os.path.join(workdir, CENTERS_FILE)


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS_FILE)


def results_path(workdir: str) -> str:
  return os.path.join(workdir, RESULTS_FILE)


def attention_path(workdir: str) -> str:
  return os.path.join(workdir, ATTENTION_FILE)


def unreadable_path(workdir: str) -> str:
  return os.path.join(workdir, UNREADABLE_FILE)


def done_path(workdir: str) -> str:
  return os.path.join(workdir, DONE_FILE)


# ----------------------------------------------------------------------------- params
def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """`{"a": {"b": x}}` -> `{"a/b": np.asarray(x)}`."""
  flat: dict[str, np.ndarray] = {}
  for key, value in tree.items():
    if "/" in str(key):
      raise ValueError(f"parameter name {key!r} contains '/', which flattening reserves")
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_params(value, name + "/"))
    else:
      flat[name] = np.asarray(value)
  return flat


def unflatten_params(flat: Mapping[str, Any]) -> Params:
  """`{"a/b": x}` -> `{"a": {"b": x}}`."""
  tree: Params = {}
  for name, value in flat.items():
    parts = name.split("/")
    node = tree
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"parameter {name!r} clashes with a leaf at {part!r}")
    node[parts[-1]] = value
  return tree


def save_params(path: str, params: Mapping[str, Any]) -> None:
  """Saves a params tree as a flattened .npz, atomically."""
  flat = flatten_params(params)
  files.atomic_write(path, lambda f: np.savez(f, **flat))


def load_params(path: str) -> Params:
  """Loads a params tree saved by `save_params` (numpy arrays)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"params file not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {name: data[name] for name in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # truncated or not an npz
    raise UserError(f"{path}: not a readable params .npz ({type(err).__name__}: "
                    f"{files.one_line(err)})") from err
  if not flat:
    raise UserError(f"{path}: holds no parameters")
  return unflatten_params(flat)


def save_best(workdir: str, kind: str, params: Mapping[str, Any],
              meta: Mapping[str, Any]) -> None:
  """Writes `best/<kind>/params.npz` then `best/<kind>/meta.json` (the meta last: a reader
  that finds meta.json finds the params that go with it)."""
  save_params(best_params_path(workdir, kind), params)
  files.write_json(best_meta_path(workdir, kind), dict(meta))


def load_best(workdir: str, kind: str) -> tuple[Params, dict[str, Any]]:
  """Reads `best/<kind>`: (params, meta). meta is {} when meta.json is absent."""
  params = load_params(best_params_path(workdir, kind))
  return params, load_best_meta(workdir, kind)


def load_best_meta(workdir: str, kind: str) -> dict[str, Any]:
  """`best/<kind>/meta.json` ({} when absent), checked: an object whose "step" is an integer
  and whose "score" is a number (or null), as save_best writes them.

  Raises:
    UserError: naming the file, when it is not such an object.
  """
  path = best_meta_path(workdir, kind)
  if not os.path.isfile(path):
    return {}
  meta = files.read_json(path)
  if not isinstance(meta, dict):
    raise UserError(f"{path}: expected a JSON object, got {type(meta).__name__}")
  for key, types in (("step", (int,)), ("score", (int, float))):
    value = meta.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
      raise UserError(f"{path}: {key!r} must be a number, got {value!r}")
  if not isinstance(meta.get("metrics", {}), dict):
    raise UserError(f"{path}: 'metrics' must be an object, got {meta['metrics']!r}")
  return meta


# ----------------------------------------------------------------------------- config
def save_config(workdir: str, config: Any) -> None:
  """Writes the config (a ConfigDict or a plain dict) as `<workdir>/config.json`."""
  data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  files.write_json(config_path(workdir), data)


# Settings a run may change when it resumes: where things are (paths move between machines),
# how long it runs, how often it logs and saves, memory caps that leave the math unchanged,
# everything about downstream evaluation and the demo's own switches. Any other difference
# would make a resumed run a different run than its checkpoints. (data.num_workers may
# change: the loader then starts at the checkpoint's step, the same batches. So may
# data.skip_unreadable_share: it only decides whether the run goes on, since the records it
# drops are the unreadable ones, whatever the share.)
RESUMABLE_CHANGES = ("backbone.weights", "backbone.cache_dir", "data.pretrain_root",
                     "data.pretrain_tfds_dir", "data.num_workers", "data.skip_unreadable_share",
                     "data.val_root",
                     "optim.max_steps",
                     "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.eval_every_epochs",
                     "train.compilation_cache",
                     "train.max_similarities", "loss.angle_block_size")
RESUMABLE_SECTIONS = ("eval.", "demo.", "detect.")
# Of those paths, lists of datasets (comma-separated): a path may move, but a dataset added or
# dropped would make another pretraining set.
PATH_LISTS = ("data.pretrain_root", "data.pretrain_tfds_dir")


def has_checkpoint(workdir: str) -> bool:
  """Whether the run has a finished orbax checkpoint (a step folder) to resume from."""
  folder = checkpoints_dir(workdir)
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def _flat_settings(data: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(data, Mapping):
    out: dict[str, Any] = {}
    for key, value in data.items():
      out.update(_flat_settings(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: data}


def flat_config(config: Any) -> dict[str, Any]:
  """{"section.key": value} of a ConfigDict or dict, as its JSON gives it back (tuples become
  lists, as save_config stores them)."""
  data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return _flat_settings(json.loads(json.dumps(data, default=files.json_default)))


def config_changes(workdir: str, config: Any) -> list[str]:
  """What `config` changes of the run already in `workdir`, beyond RESUMABLE_CHANGES.

  Returns:
    ["key (old there, new here)", ...]; empty when the workdir has no config.json yet.
  """
  if not os.path.isfile(config_path(workdir)):
    return []
  new = flat_config(config)
  data = files.read_json(config_path(workdir))
  if not isinstance(data, dict):
    raise UserError(f"{config_path(workdir)}: expected a JSON object, got {type(data).__name__}")
  old = _flat_settings(data)
  changes = []
  for key in sorted(set(old) | set(new)):
    if key in PATH_LISTS and key in old and _entries(old[key]) != _entries(new.get(key)):
      changes.append(f"{key} ({_entries(old[key])} datasets there, {_entries(new.get(key))} "
                     "here: a dataset added or dropped makes another pretraining set)")
      continue
    if key.startswith(RESUMABLE_SECTIONS) or key in RESUMABLE_CHANGES:
      continue
    if key not in old:  # a setting added by a later adjax, with the run's behaviour as default
      continue
    if old.get(key) != new.get(key):
      changes.append(f"{key} ({old.get(key)!r} there, {new.get(key)!r} here)")
  return changes


def comma_list(value: Any) -> list[str]:
  """The entries of a comma-separated setting (folders, packs, classes), stripped."""
  return [part.strip() for part in str(value or "").split(",") if part.strip()]


def _entries(value: Any) -> int:
  """How many comma-separated entries a path-list setting names."""
  return len(comma_list(value))


def load_config(workdir: str):
  """Reads `<workdir>/config.json` on top of `adjax.configs.default_config()`.

  Values take the default's types (JSON lists become tuples where the default is a tuple);
  keys the default does not have are added as they are.

  Returns:
    An ml_collections.ConfigDict.

  Raises:
    UserError: the file is not JSON, not an object, or a value does not fit the default's
      type (naming the file and the setting).
  """
  from adjax.configs import default_config  # ml_collections; only when configs are used
  path = config_path(workdir)
  data = files.read_json(path)
  if not isinstance(data, dict):
    raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
  config = default_config()
  try:
    merge_into_config(config, data)
  except (TypeError, ValueError) as err:
    raise UserError(f"{path}: {files.one_line(err)}") from err
  return config


def merge_into_config(config: Any, data: Mapping[str, Any], prefix: str = "") -> None:
  """Recursively sets `data` into `config` (a ConfigDict), keeping the config's field types.

  Raises:
    TypeError: a value that does not fit the type of the setting it replaces, naming the
      setting (a section replaced by a value, text for a number, true for a number).
  """
  for key, value in data.items():
    name = f"{prefix}{key}"
    if key in config and hasattr(config[key], "keys"):
      if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a section (a JSON object), got {value!r}")
      merge_into_config(config[key], value, f"{name}.")
      continue
    if isinstance(value, Mapping):
      import ml_collections
      sub = ml_collections.ConfigDict()
      merge_into_config(sub, value, f"{name}.")
      config[key] = sub
      continue
    if isinstance(value, list):
      value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if key in config:
      current = config[key]
      # ml_collections casts true to 1.0 and accepts 1 for a flag; neither is what was meant.
      if (current is not None and value is not None
          and isinstance(current, bool) != isinstance(value, bool)):
        raise TypeError(f"{name} must be {type(current).__name__}, got {value!r}")
      if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
      config[key] = value
    except (TypeError, ValueError) as err:
      expected = type(config[key]).__name__ if key in config else "another type"
      raise TypeError(f"{name} must be {expected}, got {value!r}") from err
