"""`Record`: one image of any supported dataset; `LayoutError`: a folder a reader cannot read.

A record says where an image (and its mask) lives and what it is: dataset, class, camera view,
split, label and defect type. Readers (`data_pipelines/readers/`) turn a dataset's published
folder layout into records; `data_pipelines.index` reads, merges and selects them. This module
imports nothing of the project, so every other data module can import it.

Records built from packed ArrayRecord shards (`tfds_builders.packed_records`) carry
`packed = (builder_dir, split, index)` and are read from there; their `image_path` keeps the
original file name for reports.
"""

from __future__ import annotations

import dataclasses

FORMATS = ("realiad", "mvtec", "visa", "btad", "mpdd", "mvtec3d", "folder")

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
    dataset: reader format name ("realiad", "mvtec", "visa", "btad", "mpdd", "mvtec3d",
      "folder").
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


class LayoutError(ValueError):
  """A dataset folder that does not have the layout its reader expects."""
