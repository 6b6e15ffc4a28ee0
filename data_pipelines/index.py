"""The index of a pretraining or evaluation set: records read from dataset folders, merged,
selected, saved and loaded.

`read_dataset` reads one folder with its format's reader (`data_pipelines.readers`);
`build_index` and `merge_sources` merge several; `select` and `select_classes` filter.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

from adjax.errors import UserError
from adjax.io import files
from data_pipelines.readers import READERS
from data_pipelines.records import Record

Source = tuple  # (format, root) or (format, root, classes)


def read_dataset(fmt: str, root: str, classes: Sequence[str] | None = None, *,
                 masks_optional: bool = False) -> list[Record]:
  """Records of one dataset folder.

  Args:
    fmt: one of FORMATS.
    root: the dataset's root folder (the one that holds the class folders; for VisA the one
      that holds split_csv/).
    classes: the classes to keep (None: every class found). Asking for a class that is not
      there is an error.
    masks_optional: keep anomalous images without a mask (mask_path None) instead of failing
      (config.eval.masks_optional); the `folder` format always keeps them.

  Returns:
    records sorted by (class, split, defect type, path).
  """
  if fmt not in READERS:
    raise ValueError(f"unknown dataset format {fmt!r}; expected one of {sorted(READERS)}")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{fmt} root {root!r} does not exist or is not a folder")
  return sorted(READERS[fmt](root, classes, masks_optional=masks_optional))


def build_index(sources: Iterable[Source]) -> list[Record]:
  """Merges several datasets into one index.

  Args:
    sources: (format, root) or (format, root, classes) tuples, e.g.
      [("realiad", "/data/realiad_512"), ("mvtec", "/data/mvtec", ["bottle"])].

  Returns:
    every record, in a deterministic order (sorted).
  """
  records: list[Record] = []
  for src in sources:
    if not isinstance(src, (tuple, list)) or len(src) not in (2, 3):
      raise ValueError(
          f"a source must be (format, root) or (format, root, classes), got {src!r}")
    fmt, root = src[0], os.fspath(src[1])
    classes = src[2] if len(src) == 3 else None
    records.extend(read_dataset(fmt, root, classes))
  return sorted(records)


def select(records: Sequence[Record], *, datasets: Sequence[str] | None = None,
           classes: Sequence[str] | None = None, splits: Sequence[str] | None = None
           ) -> list[Record]:
  """Filters records; a requested dataset or class that matches nothing is an error."""
  out = list(records)
  for name, wanted, key in (("dataset", datasets, "dataset"), ("class", classes, "class_name"),
                            ("split", splits, "split")):
    if wanted is None:
      continue
    have = {getattr(r, key) for r in out}
    missing = sorted(set(wanted) - have)
    if missing:
      raise ValueError(f"{name} {missing} not in the index (found {sorted(have)})")
    out = [r for r in out if getattr(r, key) in set(wanted)]
  return out


def save_index(records: Sequence[Record], path: str) -> None:
  """Writes the index as JSON lines (one record a line)."""
  lines = [json.dumps(r.to_json()) + "\n" for r in records]
  files.atomic_write(path, lambda f: f.writelines(lines), binary=False)


def load_index(path: str) -> list[Record]:
  """Reads an index written by `save_index`."""
  with open(path) as f:
    return [Record.from_json(json.loads(line)) for line in f if line.strip()]


def merge_sources(formats: Sequence[str], per_source: Sequence[list[Record]]) -> list[Record]:
  """One sorted index of several sources; a format that comes more than once gets its
  position in the list ("mvtec#2"), so that its folders stay different datasets."""
  repeated = {f for f in formats if formats.count(f) > 1}
  merged = []
  for position, (fmt, records) in enumerate(zip(formats, per_source), start=1):
    if fmt in repeated:
      records = [dataclasses.replace(r, dataset=f"{fmt}#{position}") for r in records]
    merged.extend(records)
  return sorted(merged)


def select_classes(records: Sequence[Record], classes: Sequence[str], where: str
                   ) -> list[Record]:
  """The records of the named classes ("class" or "dataset/class"); naming one that is not
  there is an error."""
  kept = [r for r in records if r.class_name in classes or r.class_key in classes]
  found = {r.class_name for r in kept} | {r.class_key for r in kept}
  missing = [c for c in classes if c not in found]
  if missing:
    raise UserError(f"config.data.pretrain_classes names {missing}, which {where} does not "
                    f"hold; it has {sorted({r.class_key for r in records})}")
  return kept
