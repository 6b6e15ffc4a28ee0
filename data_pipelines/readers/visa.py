"""VisA reader: `split_csv/1cls.csv` with columns object, split, label, image, mask (paths
relative to the root; label "normal" or "anomaly"). Masks hold class indices; any non-zero
pixel is anomalous."""

from __future__ import annotations

import csv
import os
from typing import Sequence

from data_pipelines.readers._common import choose_classes, layout_error
from data_pipelines.records import LayoutError
from data_pipelines.records import Record

EXPECTED = "split_csv/1cls.csv with columns object,split,label,image,mask"
COLUMNS = ("object", "split", "label", "image", "mask")


def read(root: str, classes: Sequence[str] | None = None,
         csv_name: str = "1cls.csv", masks_optional: bool = False) -> list[Record]:
  """VisA records from the one-class split file.

  Args:
    root: the VisA folder (holding split_csv/ and the class folders).
    classes: classes to keep, None for all.
    csv_name: the split file inside split_csv/.
    masks_optional: keep an anomalous image whose mask is not given or not there
      (mask_path None).

  Returns:
    unsorted records.
  """
  csv_path = os.path.join(root, "split_csv", csv_name)
  if not os.path.isfile(csv_path):
    raise layout_error("visa", root, EXPECTED)
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows or any(c not in rows[0] for c in COLUMNS):
    header = list(rows[0]) if rows else []
    raise LayoutError(f"visa split file {csv_path!r} must have columns {list(COLUMNS)}, "
                      f"found {header}")
  found = sorted({r["object"] for r in rows})
  keep = set(choose_classes("visa", root, found, classes))
  records = []
  for line, r in enumerate(rows, start=2):
    if r["object"] not in keep:
      continue
    label = {"normal": 0, "anomaly": 1}.get(r["label"].strip())
    split = r["split"].strip()
    if label is None or split not in ("train", "test"):
      raise LayoutError(f"{csv_path}:{line}: expected split train|test and label "
                        f"normal|anomaly, got split={split!r} label={r['label']!r}")
    image = os.path.join(root, r["image"].strip())
    mask_rel = (r["mask"] or "").strip()
    mask = os.path.join(root, mask_rel) if mask_rel else None
    if mask is not None and masks_optional and not os.path.isfile(mask):
      mask = None
    for p in (image, mask):
      if p is not None and not os.path.isfile(p):
        raise LayoutError(f"{csv_path}:{line}: file {p!r} does not exist")
    if label == 1 and mask is None and not masks_optional:
      raise LayoutError(f"{csv_path}:{line}: anomalous image {image!r} has no mask")
    records.append(Record("visa", r["object"], "", split, label,
                          "anomaly" if label else "good", image, mask if label else None))
  return records
