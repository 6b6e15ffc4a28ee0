"""The merged index: one `Record` per image of any supported dataset, and the selection config.

A record says where an image (and its mask) lives and what it is: dataset, class, camera view,
split, label and defect type. Readers (`data_pipelines/readers/`) turn a dataset's published
folder layout into records; `build_index` merges several datasets; `DataSelection` says which
datasets and classes make the pretraining set and which are evaluated.

Records built from packed ArrayRecord shards (`tfds_builders.packed_records`) carry
`packed = (builder_dir, split, index)` and are read from there; their `image_path` keeps the
original file name for reports.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

FORMATS = ("realiad", "mvtec", "visa", "btad", "mpdd", "mvtec3d")

# The 30 RealIAD classes: the paper's default pretraining set.
REALIAD_CLASSES = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint",
    "mounts", "pcb", "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll",
    "regulator", "rolled_strip_base", "sim_card_set", "switch", "tape", "terminalblock",
    "toothbrush", "toy", "toy_brick", "transistor1", "u_block", "usb", "usb_adaptor", "vcpill",
    "wooden_beads", "woodstick", "zipper")


@dataclasses.dataclass(frozen=True, order=True)
class Record:
  """One image of the merged index.

  Attributes:
    dataset: reader format name ("realiad", "mvtec", "visa", "btad", "mpdd", "mvtec3d").
    class_name: object / texture class ("bottle", "audiojack", "01", ...).
    view: camera view ("C1".."C5" for RealIAD; "" for single-view datasets).
    split: "train", "test", or "all" (RealIAD without split files).
    label: 0 normal, 1 anomalous.
    defect_type: "good" for normal images, otherwise the dataset's defect name or code.
    image_path: the image file.
    mask_path: the mask file, or None (normal images; anomalous images without a mask).
    sample_id: the physical sample (RealIAD "S0001"), "" elsewhere.
    packed: (builder_dir, split, index) when the bytes come from ArrayRecord shards.
  """
  dataset: str
  class_name: str
  view: str
  split: str
  label: int
  defect_type: str
  image_path: str
  mask_path: str | None = None
  sample_id: str = ""
  packed: tuple[str, str, int] | None = None

  @property
  def class_key(self) -> str:
    """The class as the reference groups know it: "dataset/class", since merged datasets may
    share a class name (MVTec AD's and Real-IAD's "zipper" are different objects)."""
    return f"{self.dataset}/{self.class_name}"

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["packed"] = list(self.packed) if self.packed else None
    return d

  @classmethod
  def from_json(cls, d: dict) -> "Record":
    d = dict(d)
    if d.get("packed") is not None:
      d["packed"] = tuple(d["packed"])
    return cls(**d)


Source = tuple  # (format, root) or (format, root, classes)


def _reader(fmt: str):
  from data_pipelines.readers import READERS  # Late import: readers import Record from here.
  if fmt not in READERS:
    raise ValueError(f"unknown dataset format {fmt!r}; expected one of {sorted(READERS)}")
  return READERS[fmt]


def read_dataset(fmt: str, root: str, classes: Sequence[str] | None = None) -> list[Record]:
  """Records of one dataset folder.

  Args:
    fmt: one of FORMATS.
    root: the dataset's root folder (the one that holds the class folders; for VisA the one
      that holds split_csv/).
    classes: the classes to keep (None: every class found). Asking for a class that is not
      there is an error.

  Returns:
    records sorted by (class, split, defect type, path).
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{fmt} root {root!r} does not exist or is not a folder")
  return sorted(_reader(fmt)(root, classes))


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


@dataclasses.dataclass(frozen=True)
class DataSelection:
  """Which datasets and classes are used for pretraining and which are evaluated.

  Each entry is (format, root) or (format, root, classes); classes None means all. The default
  pretraining set is all RealIAD classes found under `pretrain[0][1]`.
  """
  pretrain: tuple = ()
  evaluate: tuple = ()

  @classmethod
  def paper_default(cls, realiad_root: str, eval_sources: Sequence[Source] = ()
                    ) -> "DataSelection":
    """All 30 RealIAD classes for pretraining (the paper's setting)."""
    return cls(pretrain=(("realiad", realiad_root, REALIAD_CLASSES),),
               evaluate=tuple(tuple(s) for s in eval_sources))

  def pretrain_records(self) -> list[Record]:
    return build_index(self.pretrain)

  def eval_records(self) -> list[Record]:
    return build_index(self.evaluate)


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


def summarize(records: Sequence[Record]) -> dict:
  """Counts per (dataset, class): images, anomalous images, views, splits."""
  out: dict = {}
  for r in records:
    d = out.setdefault(f"{r.dataset}/{r.class_name}",
                       {"images": 0, "anomalous": 0, "views": set(), "splits": set()})
    d["images"] += 1
    d["anomalous"] += r.label
    d["views"].add(r.view)
    d["splits"].add(r.split)
  for d in out.values():
    d["views"], d["splits"] = sorted(d["views"]), sorted(d["splits"])
  return out


def save_index(records: Sequence[Record], path: str) -> None:
  """Writes the index as JSON lines (one record a line)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r.to_json()) + "\n")
  os.replace(tmp, path)


def load_index(path: str) -> list[Record]:
  """Reads an index written by `save_index`."""
  with open(path) as f:
    return [Record.from_json(json.loads(line)) for line in f if line.strip()]
