"""BTAD reader: `<class>/train/ok/*`, `<class>/test/ok/*`, `<class>/test/ko/*` with masks
`<class>/ground_truth/ko/<stem>.<bmp|png>`; classes are `01`, `02`, `03`; images `.bmp` or
`.png`."""

from __future__ import annotations

import os
from typing import Sequence

from data_pipelines.readers._common import (choose_classes, find_by_stem, images_in,
                                            layout_error, LayoutError)
from data_pipelines.records import Record

EXPECTED = "<class>/train/ok/<image>, <class>/test/{ok,ko}/<image> and " \
           "<class>/ground_truth/ko/<stem>.{bmp,png}"


def read(root: str, classes: Sequence[str] | None = None,
         masks_optional: bool = False) -> list[Record]:
  """BTAD records.

  Args:
    root: the folder holding 01/, 02/, 03/ (BTech_Dataset_transformed).
    classes: classes to keep, None for all.
    masks_optional: keep an anomalous image without a mask (mask_path None).

  Returns:
    unsorted records.
  """
  found = [c for c in sorted(os.listdir(root))
           if os.path.isdir(os.path.join(root, c, "train", "ok"))]
  if not found:
    raise layout_error("btad", root, EXPECTED)
  records = []
  for cls in choose_classes("btad", root, found, classes):
    base = os.path.join(root, cls)
    for n in images_in(os.path.join(base, "train", "ok")):
      records.append(Record("btad", cls, "", "train", 0, "good",
                            os.path.join(base, "train", "ok", n)))
    ok, ko = os.path.join(base, "test", "ok"), os.path.join(base, "test", "ko")
    if not images_in(ok) and not images_in(ko):
      raise layout_error("btad", root, EXPECTED, os.path.join(base, "test"))
    for n in images_in(ok):
      records.append(Record("btad", cls, "", "test", 0, "good", os.path.join(ok, n)))
    gt = os.path.join(base, "ground_truth", "ko")
    for n in images_in(ko):
      path = os.path.join(ko, n)
      mask = find_by_stem(gt, os.path.splitext(n)[0])
      if mask is None and not masks_optional:
        raise LayoutError(f"btad: anomalous image {path!r} has no mask in {gt!r}")
      records.append(Record("btad", cls, "", "test", 1, "ko", path, mask))
  return records
