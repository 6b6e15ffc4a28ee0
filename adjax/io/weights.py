"""The one reader of weight files: safetensors, npz and PyTorch checkpoints, by content.

No code in a file is ever run: PyTorch files go through adjax.io.torch_pickle, which refuses
anything but tensors and plain containers. Backbones (adjax.models.backbones.base) and projector
import (adjax.interop) both read through here.

Files are untrusted: each reader checks the sizes a file declares against the bytes it holds
before allocating, and refuses a bad file with one CheckpointError / SafetensorsError line
(adjax UserErrors) that names it.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

from adjax.io import files
from adjax.io import safetensors
from adjax.io import torch_pickle
from adjax.io.torch_pickle import MAX_INFLATION, CheckpointError

StateDict = dict[str, np.ndarray]

# Extensions that decide the reader; other names are recognised by their first bytes.
_TORCH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")
_NPZ_EXTENSIONS = (".npz",)
_SAFETENSORS_EXTENSIONS = (".safetensors",)


def _not_weights_reason(head: bytes) -> str | None:
  """Why a file that starts with ``head`` is no weights file at all, or None.

  A git-lfs pointer (the repository was cloned without ``git lfs pull``) or an HTML page (a
  download that got a login or error page) would otherwise reach a binary reader and fail with
  a message about a corrupt header that hides the real cause.
  """
  if not head:
    return "it is empty (0 bytes)"
  if b"\x00" in head:  # binary (a safetensors header length has zero bytes): not text
    return None
  text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
  if text.startswith(b"version https://git-lfs"):
    return "it is a git-lfs pointer; run `git lfs pull` to fetch the weights"
  if text.startswith(b"<"):
    return "it is an HTML/XML page (a failed download?); download it again"
  return None


def _reader_for(path: str, head: bytes) -> str | None:
  """'torch', 'safetensors' or 'npz' by the extension, else by the first bytes; None if unknown."""
  lower = path.lower()
  if lower.endswith(_TORCH_EXTENSIONS):
    return "torch"
  if lower.endswith(_SAFETENSORS_EXTENSIONS):
    return "safetensors"
  if lower.endswith(_NPZ_EXTENSIONS):
    return "npz"
  if head[:2] == b"PK" or head[:1] == b"\x80":  # zip (torch.save) or legacy pickle
    return "torch"
  if head[8:9] == b"{":  # 8-byte header length, then the JSON header
    return "safetensors"
  return None


def _npz_member(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo,
                file_bytes: int) -> np.ndarray:
  """One .npy member, its sizes checked before numpy allocates the array it declares (numpy
  allocates the whole shape up front, and a deflated member may be a zip bomb)."""
  if info.header_offset + info.compress_size > file_bytes:
    raise CheckpointError(f"{path}: member {info.filename!r} runs past the end of the file "
                          "(truncated or corrupt)")
  room = info.compress_size if info.compress_type == zipfile.ZIP_STORED else (
      MAX_INFLATION * info.compress_size + (1 << 20))
  if info.file_size > room:
    raise CheckpointError(f"{path}: member {info.filename!r} declares {info.file_size} bytes "
                          f"from {info.compress_size} compressed bytes; refusing a zip bomb")
  with zf.open(info) as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)  # 3.0 differs in encoding only
    shape, _, dtype = read_header(f)
  nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
  if dtype.hasobject or nbytes > info.file_size:
    raise CheckpointError(f"{path}: member {info.filename!r} declares an array of shape {shape} "
                          f"({nbytes} bytes of {dtype}) in {info.file_size} bytes (corrupt)")
  with zf.open(info) as f:
    return np.lib.format.read_array(f, allow_pickle=False)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  out = {}
  try:
    with zipfile.ZipFile(path) as zf:
      for info in zf.infolist():
        if not info.filename.endswith(".npy"):
          raise CheckpointError(f"{path}: member {info.filename!r} is not a .npy array")
        out[info.filename[:-4]] = _npz_member(path, zf, info, os.path.getsize(path))
  except CheckpointError:
    raise
  except Exception as err:  # pylint: disable=broad-except
    # zipfile and numpy's header parser raise many kinds on a hostile file; one line for all.
    raise CheckpointError(f"{path}: not a readable .npz ({type(err).__name__}: "
                          f"{files.one_line(err)[:200]})") from None
  return out


def read_weights_file(path: str | os.PathLike) -> tuple[Any, dict[str, str]]:
  """Reads a weights file without running any of its code.

  Args:
    path: ``.safetensors``, ``.npz``, or a PyTorch ``.pth``/``.pt``/``.bin``/``.ckpt`` (zip,
      legacy or TorchScript); a file with another extension is recognised by its first bytes.

  Returns:
    (what the file holds: a flat dict of arrays for safetensors and npz, the unpickled tree of
    a PyTorch file), and the safetensors ``__metadata__`` strings ({} for the other kinds).

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: not a weights file (empty, git-lfs pointer, HTML page, unknown format),
      or an unreadable one (the message names the file).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file not found: {path}")
  with open(path, "rb") as f:
    head = f.read(64)
  reason = _not_weights_reason(head)
  if reason is not None:
    raise CheckpointError(f"{path} is not a weights file: {reason}")
  reader = _reader_for(path, head)
  if reader is None:
    raise CheckpointError(
        f"{path} is not a recognised weights file: expected a .safetensors, a .npz or a "
        f"PyTorch .pth/.pt/.bin/.ckpt checkpoint; the file starts with {head[:16]!r}")
  if reader == "safetensors":
    return dict(safetensors.load_safetensors(path)), safetensors.read_metadata(path)
  if reader == "npz":
    return _read_npz(path), {}
  return torch_pickle.load_torch_file(path), {}


def read_state_dict(path: str | os.PathLike) -> StateDict:
  """A weights file as a flat ``{key: numpy array}`` dict (see `read_weights_file`).

  Common wrappers (``{'state_dict': ...}``, ``{'model': ...}``, ``{'teacher': ...}``,
  ``{'module': ...}``) are unwrapped.

  Raises:
    FileNotFoundError, CheckpointError: as `read_weights_file`; also a file with no tensors.
  """
  obj, _ = read_weights_file(path)
  for key in ("state_dict", "model", "teacher", "module"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
      break
  flat = torch_pickle.flatten_state(obj, path=os.fspath(path))
  if not flat:
    raise CheckpointError(f"{path}: the checkpoint holds no tensors")
  return flat
