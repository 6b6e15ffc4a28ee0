"""`folder` reader: a dataset as people arrange their own images, in MVTec AD's shape but with
any image format, any depth and masks optional.

  <root>/<class>/train/good/...<image>             normal training images
  <root>/<class>/test/good/...<image>              normal test images
  <root>/<class>/test/<defect type>/...<image>     anomalous test images
  <root>/<class>/ground_truth/<defect type>/...<stem>[_mask].<ext>   their masks, if any

Images are found at any depth below each type folder, in any format of `IMAGE_EXTS`. A mask is
matched to its image by stem, with or without a `_mask` suffix, in any image format: first in
the same sub-folder below `ground_truth/<defect type>/` as the image below `test/<defect
type>/`, else anywhere below `ground_truth/<defect type>/` when exactly one file there has that
stem. An anomalous image without a mask is kept with `mask_path` None (the evaluation leaves it
out of the pixel metrics); masks are always optional in this format.
"""

from __future__ import annotations

import os
from typing import Sequence

from data_pipelines.readers._common import (choose_classes, images_under, is_image,
                                            layout_error, listing, subdirs, LayoutError)
from data_pipelines.records import Record

EXPECTED = "<class>/train/good/<images>, <class>/test/<good or defect type>/<images> and " \
           "optionally <class>/ground_truth/<defect type>/<stem>[_mask].<ext>"


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


class _Masks:
  """The mask files below one `ground_truth/<defect type>/` folder, looked up by image."""

  def __init__(self, folder: str):
    self.folder = folder
    self.by_place: dict[tuple[str, str], str] = {}   # (sub-folder, stem) -> path
    self.by_stem: dict[str, list[str]] = {}
    for path in images_under(folder):
      sub = os.path.relpath(os.path.dirname(path), folder)
      stem = _stem(path)
      for key in {stem, stem[:-len("_mask")] if stem.endswith("_mask") else stem}:
        self.by_place.setdefault((sub, key), path)
        self.by_stem.setdefault(key, []).append(path)

  def find(self, image: str, type_dir: str) -> str | None:
    """The mask of `image` (below `type_dir`), or None; several candidates are an error."""
    sub, stem = os.path.relpath(os.path.dirname(image), type_dir), _stem(image)
    if (sub, stem) in self.by_place:
      return self.by_place[(sub, stem)]
    found = sorted(set(self.by_stem.get(stem, [])))
    if len(found) > 1:
      raise LayoutError(f"folder: image {image!r} matches several masks by its stem "
                        f"{stem!r} ({found[:3]}); put each mask in the sub-folder of "
                        f"{self.folder!r} that mirrors its image's")
    return found[0] if found else None


def _read_class(root: str, cls: str) -> list[Record]:
  base = os.path.join(root, cls)
  train_good = os.path.join(base, "train", "good")
  if not os.path.isdir(train_good):
    raise layout_error("folder", root, EXPECTED + f"; class {cls!r} has no train/good/", base)
  train = images_under(train_good)
  if not train:
    raise LayoutError(f"folder: {train_good!r} holds no images (expected the class's normal "
                      f"training images, at any depth); found {listing(train_good)}")
  test_dir = os.path.join(base, "test")
  if not os.path.isdir(test_dir):
    raise layout_error("folder", root, EXPECTED + f"; class {cls!r} has no test/", base)
  loose = [n for n in os.listdir(test_dir)
           if is_image(n) and os.path.isfile(os.path.join(test_dir, n))]
  if loose:
    raise LayoutError(f"folder: {test_dir!r} holds images outside a type folder "
                      f"({sorted(loose)[:3]}); put them in test/good/ or test/<defect type>/")
  records = [Record("folder", cls, "", "train", 0, "good", p) for p in train]
  for dtype in subdirs(test_dir):
    type_dir = os.path.join(test_dir, dtype)
    masks = None if dtype == "good" else _Masks(os.path.join(base, "ground_truth", dtype))
    for path in images_under(type_dir):
      if masks is None:
        records.append(Record("folder", cls, "", "test", 0, "good", path))
      else:
        records.append(Record("folder", cls, "", "test", 1, dtype, path,
                              masks.find(path, type_dir)))
  if not any(r.split == "test" for r in records):
    raise LayoutError(f"folder: {test_dir!r} holds no images (expected test/good/ and "
                      f"test/<defect type>/ folders of images); found {listing(test_dir)}")
  return records


def read(root: str, classes: Sequence[str] | None = None,
         masks_optional: bool = True) -> list[Record]:
  """Records of a `folder` dataset (see the module docstring).

  Args:
    root: the folder holding one sub-folder per class; every sub-folder is a class.
    classes: classes to keep, None for all.
    masks_optional: accepted for the readers' common signature; masks are always optional here.

  Returns:
    unsorted records.
  """
  del masks_optional
  found = subdirs(root)
  if not found or os.path.isdir(os.path.join(root, "train")):
    hint = (" (this looks like a single class folder; pass its parent)"
            if os.path.isdir(os.path.join(root, "train")) else "")
    raise LayoutError(str(layout_error("folder", root, EXPECTED)) + hint)
  records = []
  for cls in choose_classes("folder", root, found, classes):
    records.extend(_read_class(root, cls))
  return records
