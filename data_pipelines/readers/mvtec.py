"""MVTec AD reader: `<class>/train/good/*.png`, `<class>/test/<type>/*.png`,
`<class>/ground_truth/<type>/<stem>_mask.png`. MPDD uses the same layout."""

from __future__ import annotations

import os
from typing import Sequence

from data_pipelines.readers._common import (choose_classes, find_by_stem, images_in,
                                            layout_error, subdirs, LayoutError)
from data_pipelines.records import Record

EXPECTED = "<class>/train/good/<image>, <class>/test/<defect type>/<image> and " \
           "<class>/ground_truth/<defect type>/<stem>_mask.png"


def read_mvtec_like(fmt: str, root: str, classes: Sequence[str] | None,
                    masks_optional: bool = False) -> list[Record]:
  """Records of an MVTec-AD-style folder.

  Args:
    fmt: the dataset name stored in the records ("mvtec" or "mpdd").
    root: folder holding one sub-folder per class.
    classes: classes to keep, None for all.
    masks_optional: keep an anomalous image without a mask (mask_path None) instead of
      failing (a missing mask is usually a broken download).

  Returns:
    unsorted records.
  """
  found = [c for c in subdirs(root)
           if os.path.isdir(os.path.join(root, c, "train"))
           and os.path.isdir(os.path.join(root, c, "test"))]
  if not found:
    hint = (" (this looks like a single class folder; pass its parent)"
            if os.path.isdir(os.path.join(root, "train")) else "")
    raise LayoutError(str(layout_error(fmt, root, EXPECTED)) + hint)
  records = []
  for cls in choose_classes(fmt, root, found, classes):
    base = os.path.join(root, cls)
    train_good = os.path.join(base, "train", "good")
    names = images_in(train_good)
    if not names:
      raise layout_error(fmt, root, EXPECTED, os.path.join(base, "train"))
    for n in names:
      records.append(Record(fmt, cls, "", "train", 0, "good", os.path.join(train_good, n)))
    test_types = subdirs(os.path.join(base, "test"))
    if not test_types:
      raise layout_error(fmt, root, EXPECTED, os.path.join(base, "test"))
    for dtype in test_types:
      folder = os.path.join(base, "test", dtype)
      for n in images_in(folder):
        path = os.path.join(folder, n)
        if dtype == "good":
          records.append(Record(fmt, cls, "", "test", 0, "good", path))
          continue
        gt_dir = os.path.join(base, "ground_truth", dtype)
        stem = os.path.splitext(n)[0]
        mask = find_by_stem(gt_dir, stem + "_mask") or find_by_stem(gt_dir, stem)
        if mask is None and not masks_optional:
          raise LayoutError(
              f"{fmt}: anomalous image {path!r} has no mask; expected "
              f"{os.path.join(gt_dir, stem + '_mask.png')!r}")
        records.append(Record(fmt, cls, "", "test", 1, dtype, path, mask))
  return records


def read(root: str, classes: Sequence[str] | None = None,
         masks_optional: bool = False) -> list[Record]:
  """MVTec AD records (see `read_mvtec_like`)."""
  return read_mvtec_like("mvtec", root, classes, masks_optional)
