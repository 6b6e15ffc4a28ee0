"""MVTec 3D-AD reader, RGB only: `<class>/{train,validation}/good/rgb/*.png`,
`<class>/test/<type>/rgb/*.png` with masks `<class>/test/<type>/gt/<stem>.png`. The point clouds
(`xyz/*.tiff`) are ignored. The training normals are train/good only, as in the reference's
evaluation; `include_validation=True` adds validation/good."""

from __future__ import annotations

import os
from typing import Sequence

from data_pipelines.readers._common import (choose_classes, find_by_stem, images_in,
                                            layout_error, subdirs, LayoutError)
from data_pipelines.records import Record

EXPECTED = "<class>/train/good/rgb/<image>, <class>/test/<type>/rgb/<image> and " \
           "<class>/test/<type>/gt/<image>"


def read(root: str, classes: Sequence[str] | None = None,
         include_validation: bool = False, masks_optional: bool = False) -> list[Record]:
  """MVTec 3D-AD RGB records.

  Args:
    root: folder holding one sub-folder per class.
    classes: classes to keep, None for all.
    include_validation: add validation/good images to the training normals (the reference
      does not).
    masks_optional: keep an anomalous image without a mask (mask_path None).

  Returns:
    unsorted records.
  """
  found = [c for c in subdirs(root)
           if os.path.isdir(os.path.join(root, c, "train", "good", "rgb"))]
  if not found:
    raise layout_error("mvtec3d", root, EXPECTED)
  records = []
  for cls in choose_classes("mvtec3d", root, found, classes):
    base = os.path.join(root, cls)
    for split_dir in ("train", "validation") if include_validation else ("train",):
      folder = os.path.join(base, split_dir, "good", "rgb")
      for n in images_in(folder):
        records.append(Record("mvtec3d", cls, "", "train", 0, "good", os.path.join(folder, n)))
    test_types = subdirs(os.path.join(base, "test"))
    if not test_types:
      raise layout_error("mvtec3d", root, EXPECTED, base)
    for dtype in test_types:
      rgb = os.path.join(base, "test", dtype, "rgb")
      gt = os.path.join(base, "test", dtype, "gt")
      names = images_in(rgb)
      if not names:
        raise layout_error("mvtec3d", root, EXPECTED, os.path.join(base, "test", dtype))
      for n in names:
        path = os.path.join(rgb, n)
        if dtype == "good":
          records.append(Record("mvtec3d", cls, "", "test", 0, "good", path))
          continue
        mask = find_by_stem(gt, os.path.splitext(n)[0])
        if mask is None and not masks_optional:
          raise LayoutError(f"mvtec3d: anomalous image {path!r} has no mask in {gt!r}")
        records.append(Record("mvtec3d", cls, "", "test", 1, dtype, path, mask))
  return records
