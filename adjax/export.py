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

import collections
import importlib.util
import io
import json
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np

from adjax import run_layout
from adjax.errors import UserError

Params = dict[str, Any]
WHICH = ("angle", "norm", "latest")
_FORMAT = "adjax-projector"


# ----------------------------------------------------------------------------- reading a run
def read_run_params(workdir: str, which: str = "angle") -> tuple[Params, dict[str, Any]]:
  """The projector params of a run and their metadata.

  Args:
    workdir: the run's workdir.
    which: "angle" / "norm" (best/<which>/params.npz, the checkpoints selected by PatchCore
      and FeatureNorm) or "latest" (the newest orbax checkpoint under checkpoints/).

  Returns:
    (params tree of numpy arrays, meta dict with at least "step" and "metrics").

  Raises:
    UserError: no such run, or it has no params of that kind.
  """
  if which not in WHICH:
    raise UserError(f"--which must be one of {', '.join(WHICH)}, got {which!r}")
  if not os.path.isdir(workdir):
    raise UserError(f"run workdir not found: {workdir}")
  if which == "latest":
    return _read_latest_checkpoint(workdir)
  path = run_layout.best_params_path(workdir, which)
  if not os.path.isfile(path):
    have = [k for k in run_layout.KINDS if os.path.isfile(run_layout.best_params_path(workdir, k))]
    hint = f"; it has {', '.join(have)}" if have else "; it has no selected checkpoint yet"
    if os.path.isdir(run_layout.checkpoints_dir(workdir)):
      hint += " (use --which latest for the newest training checkpoint)"
    raise UserError(f"{workdir} has no {which} params ({path} is missing){hint}")
  params, meta = run_layout.load_best(workdir, which)
  meta = {"step": meta.get("step"), "metrics": meta.get("metrics", {}),
          **{k: v for k, v in meta.items() if k not in ("step", "metrics")}}
  return params, meta


def _read_latest_checkpoint(workdir: str) -> tuple[Params, dict[str, Any]]:
  """Reads `state["params"]` of the newest step of the run's orbax CheckpointManager."""
  ckpt_dir = os.path.abspath(run_layout.checkpoints_dir(workdir))
  if not os.path.isdir(ckpt_dir):
    raise UserError(f"{workdir} has no checkpoints/ folder; export --which angle or norm")
  import orbax.checkpoint as ocp  # heavy; only for --which latest
  manager = ocp.CheckpointManager(ckpt_dir)
  try:
    step = manager.latest_step()
    if step is None:
      raise UserError(f"{ckpt_dir} holds no finished checkpoint")
    restored = None
    errors = []
    # The trainer saves Composite(state=StandardSave({"params": ..., ...})); try the matching
    # restore first, then the other handlers orbax may have recorded.
    for args in (ocp.args.Composite(state=ocp.args.StandardRestore()),
                 ocp.args.Composite(state=ocp.args.PyTreeRestore()), None):
      try:
        restored = manager.restore(step, args=args) if args is not None else manager.restore(step)
        break
      except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
        errors.append(f"{type(err).__name__}: {err}")
  finally:
    manager.close()
  if restored is None:
    raise UserError(f"cannot read checkpoint step {step} in {ckpt_dir}: {errors[-1][:300]}")
  state = restored["state"] if "state" in restored else restored
  if not isinstance(state, Mapping) or "params" not in state:
    raise UserError(f"checkpoint step {step} in {ckpt_dir} has no 'params' in its 'state' item")
  params = _to_numpy_tree(state["params"])
  return params, {"step": int(step), "metrics": {}}


def _to_numpy_tree(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _to_numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree, dtype=np.float32)


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


# ----------------------------------------------------------------------------- .pth writing
class _Global:
  """A `module.name` GLOBAL reference written without importing the module (torch)."""

  def __init__(self, module: str, name: str):
    self.module = module
    self.name = name

  def __call__(self, *args):  # pickle's save_reduce wants a callable; never called here
    raise TypeError(f"{self.module}.{self.name} is a name written into a pickle, not a function")


_REBUILD_TENSOR_V2 = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_CLASSES = {
    np.dtype(np.float32): _Global("torch", "FloatStorage"),
    np.dtype(np.float64): _Global("torch", "DoubleStorage"),
    np.dtype(np.float16): _Global("torch", "HalfStorage"),
    np.dtype(np.int64): _Global("torch", "LongStorage"),
    np.dtype(np.int32): _Global("torch", "IntStorage"),
    np.dtype(np.int16): _Global("torch", "ShortStorage"),
    np.dtype(np.int8): _Global("torch", "CharStorage"),
    np.dtype(np.uint8): _Global("torch", "ByteStorage"),
    np.dtype(np.bool_): _Global("torch", "BoolStorage"),
}


class _Storage:
  """One storage record of the archive: `data/<key>` holds the array's raw bytes."""

  def __init__(self, key: str, array: np.ndarray):
    self.key = key
    self.array = array


class _Tensor:
  """Pickles as `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, {})`."""

  def __init__(self, storage: _Storage):
    self.storage = storage

  def __reduce__(self):
    shape = tuple(int(n) for n in self.storage.array.shape)
    stride = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
    return (_REBUILD_TENSOR_V2,
            (self.storage, 0, shape, stride, False, collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is a dict
  """Protocol-2 pickler that writes torch GLOBALs by name and storages as persistent ids."""

  dispatch = dict(pickle._Pickler.dispatch)

  def _save_global_ref(self, obj: _Global) -> None:
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
    self.memoize(obj)

  dispatch[_Global] = _save_global_ref

  def persistent_id(self, obj: Any) -> Any:
    if isinstance(obj, _Storage):
      # What torch.save writes: ("storage", storage class, key, location, element count).
      return ("storage", _STORAGE_CLASSES[obj.array.dtype], obj.key, "cpu",
              int(obj.array.size))
    return None


def _as_records(obj: Any, storages: list[_Storage]) -> Any:
  """Replaces every numpy array in a dict tree by a _Tensor with its own storage."""
  if isinstance(obj, Mapping):
    return collections.OrderedDict((k, _as_records(v, storages)) for k, v in obj.items())
  if isinstance(obj, (np.ndarray, np.generic)):  # numpy scalars become 0-d tensors
    array = np.array(obj, order="C")  # not ascontiguousarray: it turns 0-d into 1-d
    if array.dtype not in _STORAGE_CLASSES:
      raise ValueError(f"cannot write a .pth tensor of dtype {array.dtype}")
    if array.dtype.byteorder == ">":
      array = array.astype(array.dtype.newbyteorder("<"))
    storage = _Storage(str(len(storages)), array)
    storages.append(storage)
    return _Tensor(storage)
  return obj


def _aligned_entry(zf: zipfile.ZipFile, name: str, data: bytes, align: int = 64) -> None:
  """Writes an uncompressed zip entry whose data starts at a multiple of `align` (as torch
  does, so that readers may memory-map storages), padding with an extra field."""
  offset = zf.fp.tell()
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  header = 30 + len(name.encode("utf-8")) + 4  # local header + name + the extra field's head
  pad = -(offset + header) % align
  info.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad  # id "FB", as torch's writer
  zf.writestr(info, data)


def pth_bytes(obj: Mapping[str, Any], archive: str = "archive") -> bytes:
  """PyTorch's zip checkpoint format for a dict tree of numpy arrays, written without torch.

  The layout torch.save (>= 1.6) writes: `archive/data.pkl` (protocol 2; tensors as
  `torch._utils._rebuild_tensor_v2` calls on persistent-id storages), `archive/data/<key>`
  (each storage's raw little-endian bytes), `archive/byteorder` and `archive/version` (3).
  `torch.load(..., weights_only=True)` reads it.

  Args:
    obj: nested dicts whose leaves are numpy arrays (or plain numbers and strings).
    archive: the folder name inside the zip.

  Returns:
    The file's bytes.
  """
  storages: list[_Storage] = []
  tree = _as_records(obj, storages)
  buffer = io.BytesIO()
  _TorchPickler(buffer, protocol=2).dump(tree)
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
    _aligned_entry(zf, f"{archive}/data.pkl", buffer.getvalue())
    _aligned_entry(zf, f"{archive}/byteorder", b"little")
    for storage in storages:
      _aligned_entry(zf, f"{archive}/data/{storage.key}", storage.array.tobytes())
    _aligned_entry(zf, f"{archive}/version", b"3\n")
  return out.getvalue()


def _torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


def write_pth(path: str, obj: Mapping[str, Any], *, use_torch: bool | None = None) -> None:
  """Writes a dict tree of numpy arrays as a PyTorch checkpoint, atomically.

  Args:
    path: the destination .pth file.
    obj: e.g. `{"projectors": state_dict}` with numpy arrays.
    use_torch: True: torch.save; False: our own writer; None: torch when it is installed.
  """
  if use_torch is None:
    use_torch = _torch_available()
  if use_torch:
    import torch  # optional, lazy: the library runs without it

    def to_torch(node):
      if isinstance(node, Mapping):
        return collections.OrderedDict((k, to_torch(v)) for k, v in node.items())
      return torch.from_numpy(np.ascontiguousarray(node)) if isinstance(node, np.ndarray) else node

    payload = to_torch(obj)
    run_layout.atomic_write(path, lambda f: torch.save(payload, f))
  else:
    data = pth_bytes(obj)
    run_layout.atomic_write(path, lambda f: f.write(data))


# ----------------------------------------------------------------------------- export
def _run_config(workdir: str) -> dict:
  path = run_layout.config_path(workdir)
  data = run_layout.read_json(path) if os.path.isfile(path) else {}
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
    UserError: bad destination, missing run or params.
  """
  ext = os.path.splitext(out)[1].lower()
  if ext not in (".pth", ".pt", ".safetensors"):
    raise UserError(f"--out must end in .pth or .safetensors, got {out!r}")
  params, meta = read_run_params(workdir, which)
  from adjax.convert.projector import projector_to_torch
  state_dict = projector_to_torch(params)
  settings = projector_settings(params)
  run_config = _run_config(workdir)
  summary = {"out": os.path.abspath(out), "which": which, **_features_of(run_config),
             **settings, "num_heads": _run_num_heads(run_config),
             "step": meta.get("step"), "metrics": meta.get("metrics", {}),
             "keys": len(state_dict)}
  if ext == ".safetensors":
    from adjax.convert.safetensors_io import save_safetensors
    metadata = {"format": _FORMAT, "backbone": summary["backbone"], "which": which}
    for key in ("taps", "image_size", "levels", "dims", "num_ref_tokens", "depth", "num_heads",
                "step", "metrics"):
      metadata[key] = json.dumps(summary[key], default=_json_number)
    save_safetensors(out, state_dict, metadata)
  else:
    write_pth(out, {"projectors": state_dict}, use_torch=use_torch)
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


def read_weights_file(path: str) -> tuple[Any, dict[str, str]]:
  """Reads a projector checkpoint: .pth/.pt (no code is run), .safetensors or .npz.

  Returns:
    (what the file holds: a state dict or {"projectors": state dict, ...}, metadata strings).

  Raises:
    FileNotFoundError: no such file.
    UserError: unreadable, truncated or of an unknown kind.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  with open(path, "rb") as f:
    head = f.read(8)
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    from adjax.convert.safetensors_io import load_safetensors, read_metadata
    try:
      return load_safetensors(path), read_metadata(path)
    except ValueError as err:
      raise UserError(str(err)) from err
  if ext == ".npz":
    try:
      with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}, {}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
      raise UserError(f"{path}: not a readable .npz ({type(err).__name__}: {err})") from err
  if not head:
    raise UserError(f"{path}: the file is empty")
  return _read_torch_file(path), {}


def _read_torch_file(path: str) -> Any:
  try:
    from adjax.convert.torch_pickle import load_torch_file
  except ImportError:
    load_torch_file = None
  if load_torch_file is not None:
    try:
      return load_torch_file(path)
    except ValueError as err:  # CheckpointError, UnsafeCheckpointError
      raise UserError(_one_line(str(err))) from err
  if not _torch_available():
    raise UserError(f"{path}: reading .pth files needs adjax.convert.torch_pickle or torch")
  import torch
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as err:  # torch raises many types for a bad file
    raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                    f"{_one_line(str(err))[:200]})") from err


def _one_line(text: str) -> str:
  return " ".join(text.split())


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
  raw, metadata = read_weights_file(path)
  from adjax.convert.projector import projector_from_torch
  try:
    params = projector_from_torch(raw)
  except ValueError as err:
    raise UserError(f"{path}: not a projector checkpoint: {_one_line(str(err))}") from err
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
  if metadata.get("num_heads") not in (None, "", "null"):
    config.projector.num_heads = int(json.loads(metadata["num_heads"]))
  if metadata.get("taps") not in (None, "", "null"):
    config.backbone.taps = tuple(int(t) for t in json.loads(metadata["taps"]))
  if metadata.get("image_size") not in (None, "", "null"):
    config.image_size = int(json.loads(metadata["image_size"]))
  from adjax import config_loading
  config_loading.apply_overrides(config, overrides)
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
  step = metadata.get("step")
  meta = {"step": json.loads(step) if step else None,
          "metrics": json.loads(metadata["metrics"]) if metadata.get("metrics") else {},
          "imported_from": os.path.abspath(path), "backbone": backbone}
  for k in kinds:
    run_layout.save_best(out, k, params, {**meta, "kind": k})
  return {"out": os.path.abspath(out), "kinds": kinds, "backbone": backbone, **settings,
          "step": meta["step"], "source": os.path.abspath(path)}
