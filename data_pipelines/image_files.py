"""Images as people have them: files and folders given on a command line (searched
recursively), read and preprocessed as the evaluation reads dataset images, with the files that
cannot be read named instead of stopping the batch.

Used by `adjax fit` and `adjax predict` (adjax/detector/), where the input is a folder of a
production line's images rather than a dataset in a known layout.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from data_pipelines import images as images_lib
from data_pipelines.readers._common import IMAGE_EXTS


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


def list_images(inputs: Sequence[str], *, what: str = "input") -> list[str]:
  """Every image file among `inputs` (files, or folders searched recursively), in sorted
  order within each input, each file once.

  Raises:
    FileNotFoundError: an input that does not exist.
    ValueError: no image at all.
  """
  out: list[str] = []
  seen: set[str] = set()
  for item in inputs:
    if os.path.isdir(item):
      found = sorted(os.path.join(root, name) for root, dirs, names in os.walk(item)
                     for name in names if _is_image(name))
    elif os.path.isfile(item):
      found = [item]
    else:
      raise FileNotFoundError(f"{what} {item}: no such file or folder")
    for path in found:
      key = os.path.realpath(path)
      if key not in seen:
        seen.add(key)
        out.append(path)
  if not out:
    raise ValueError(f"{what} {', '.join(inputs)}: no image files "
                     f"({', '.join(IMAGE_EXTS)}) found")
  return out


@dataclasses.dataclass
class LoadedImages:
  """Preprocessed images of some paths, and the paths that failed.

  Attributes:
    paths: the files that were read, in input order.
    images: (N, S, S, 3) uint8, the evaluation's preprocessing (short side to `resize`, centre
      crop S).
    failed: {path: reason} of the files that could not be read or decoded.
  """
  paths: list[str]
  images: np.ndarray
  failed: dict[str, str]


def load_images(paths: Sequence[str], size: int, *, resize: int | None = None,
                num_threads: int = 4) -> LoadedImages:
  """Reads and preprocesses `paths` as images_lib.preprocess_pair does for a dataset's normal
  images (so that a folder gives the features `adjax evaluate` computes for the same files).
  A file that cannot be read is left out and named in `failed`."""

  def one(path: str):
    try:
      with open(path, "rb") as f:
        data = f.read()
      image, _ = images_lib.preprocess_pair(data, None, size, image_path=path, resize=resize)
      return image, None
    except (OSError, ValueError) as err:
      return None, f"{type(err).__name__}: {err}".splitlines()[0]

  with ThreadPoolExecutor(max(1, num_threads)) as pool:
    results = list(pool.map(one, paths))
  kept = [(p, img) for p, (img, err) in zip(paths, results) if err is None]
  failed = {p: err for p, (_, err) in zip(paths, results) if err is not None}
  images = (np.stack([img for _, img in kept]) if kept
            else np.zeros((0, size, size, 3), np.uint8))
  return LoadedImages([p for p, _ in kept], images, failed)


def read_original(path: str) -> np.ndarray:
  """A file's full-size RGB pixels (for drawing its heat map)."""
  with open(path, "rb") as f:
    return images_lib.decode_image(f.read(), path)


def labelled_images(root: str) -> tuple[list[str], np.ndarray]:
  """The images of a labelled folder, `<root>/good/...` normal and every other top folder
  anomalous (a dataset's test layout), as (paths, labels).

  Raises:
    ValueError: no `good` folder, or no other folder.
  """
  if not os.path.isdir(os.path.join(root, "good")):
    raise ValueError(f"{root}: a labelled folder needs a good/ subfolder of normal images "
                     "beside its defect folders")
  paths, labels = [], []
  for name in sorted(os.listdir(root)):
    folder = os.path.join(root, name)
    if not os.path.isdir(folder) or name.startswith("."):
      continue
    found = list_images([folder], what=f"{root}:")
    paths += found
    labels += [0 if name == "good" else 1] * len(found)
  return paths, np.asarray(labels, np.int64)
