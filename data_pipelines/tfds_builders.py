"""TFDS builders that pack a dataset folder into ArrayRecord shards, and readers of the shards.

On pods, millions of small image files are slow to list and open; a packed copy is a few large
files that grain reads by random access through `tfds.data_source`. One builder per dataset
format (`adjax_realiad`, `adjax_mvtec`, ...) reads the user's folder (the manual dir) with the
same reader as the folder index and stores, per record, its fields and the encoded image and
mask bytes as `tfds.features.Tensor(dtype=np.uint8)`: no TensorFlow is needed to build or read.

The shards keep the index order (shuffling disabled) and `pack_dataset` writes the record list
beside them (`adjax_index.jsonl`), so `packed_records` can rebuild the index without reading
image bytes. Packed records equal the folder records except for `Record.packed`, and decode to
the same arrays (the bytes are the files' bytes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import images as images_lib
from data_pipelines.index import read_dataset
from data_pipelines.records import FORMATS, Record

from adjax.io import files

INDEX_FILE = "adjax_index.jsonl"
# What a pack was made from (and what it skipped): a finished pack is reused only for the same.
SETTINGS_FILE = "adjax_pack.json"

log = logging.getLogger("adjax.data")


def tfds_split(split: str) -> str:
  """TFDS split name of a record split ("all" is reserved by TFDS)."""
  return "unsplit" if split == "all" else split

_TEXT_FIELDS = ("dataset", "class_name", "view", "split", "defect_type", "image_path",
                "mask_path", "sample_id")


def _features() -> tfds.features.FeaturesDict:
  feats = {k: tfds.features.Text() for k in _TEXT_FIELDS}
  feats["label"] = tfds.features.Scalar(dtype=np.int32)
  feats["image_bytes"] = tfds.features.Tensor(shape=(None,), dtype=np.uint8)
  feats["mask_bytes"] = tfds.features.Tensor(shape=(None,), dtype=np.uint8)
  return tfds.features.FeaturesDict(feats)


class _PackedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Packs one dataset format from a manual dir; subclasses set FORMAT and name."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Records of the adjax index with encoded image and mask bytes."}
  FORMAT = ""
  # These builders download nothing and ship no checksum file; without this, tfds resolves
  # the builder's source path through `importlib_resources`, which is not installed.
  code_path = None
  url_infos = None
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Place the dataset in its published folder layout in the manual dir (see "
      "data_pipelines/readers/).")

  def __init__(self, *, classes: Sequence[str] | None = None, skip_bad: bool = False,
               max_skip_share: float = 0.01, verify: bool = True, **kwargs):
    self._classes = classes
    self._skip_bad = skip_bad
    self._max_skip_share = max_skip_share
    self._verify = verify
    self.scan_report: images_lib.ScanReport | None = None
    self.records: list[Record] = []
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=f"adjax packed {self.FORMAT} records",
        features=_features(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    records = read_dataset(self.FORMAT, root, self._classes)
    if self._verify:
      records, self.scan_report = images_lib.check_records(
          records, skip_bad=self._skip_bad, max_skip_share=self._max_skip_share)
    self.records = records
    splits = sorted({r.split for r in records})
    return {tfds_split(s): self._generate_examples([r for r in records if r.split == s])
            for s in splits}

  def _generate_examples(self, records):
    for i, r in enumerate(records):
      image, mask = images_lib.read_record_bytes(r)
      ex = {k: (getattr(r, k) or "") for k in _TEXT_FIELDS}
      ex["label"] = np.int32(r.label)
      ex["image_bytes"] = np.frombuffer(image, np.uint8)
      ex["mask_bytes"] = np.frombuffer(mask or b"", np.uint8)
      yield i, ex


def _builder_class(fmt: str) -> type:
  name = f"adjax_{fmt}"
  return type(f"Adjax{fmt.capitalize()}", (_PackedBuilder,),
              {"FORMAT": fmt, "name": name, "__module__": __name__,
               "__doc__": f"Packs a {fmt} folder into ArrayRecord shards."})


BUILDERS = {fmt: _builder_class(fmt) for fmt in FORMATS}


def pack_dataset(fmt: str, manual_dir: str, data_dir: str, *,
                 classes: Sequence[str] | None = None, skip_bad: bool = False,
                 max_skip_share: float = 0.01, verify: bool = True) -> str:
  """Packs a dataset folder into ArrayRecord shards (once; a finished copy is reused).

  Args:
    fmt: dataset format (one of records.FORMATS).
    manual_dir: the dataset folder in its published layout.
    data_dir: the TFDS data dir to write into.
    classes: classes to pack, None for all.
    skip_bad: drop unreadable images (counted, capped by max_skip_share) instead of failing.
    max_skip_share: the largest share of bad images tolerated with skip_bad.
    verify: decode every image once while packing (finds bad files before training does).

  Returns:
    the builder directory (<data_dir>/adjax_<fmt>/<version>), the argument of
    `packed_records`.
  """
  if fmt not in BUILDERS:
    raise ValueError(f"unknown dataset format {fmt!r}; expected one of {sorted(BUILDERS)}")
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"{fmt} manual dir {manual_dir!r} does not exist")
  builder = BUILDERS[fmt](data_dir=data_dir, file_format="array_record", classes=classes,
                          skip_bad=skip_bad, max_skip_share=max_skip_share, verify=verify)
  builder_dir = os.fspath(builder.data_dir)
  index_path = os.path.join(builder_dir, INDEX_FILE)
  settings = {"format": fmt, "root": os.path.abspath(manual_dir),
              "classes": sorted(classes) if classes else None, "skip_bad": bool(skip_bad),
              "max_skip_share": float(max_skip_share), "verify": bool(verify)}
  _check_reuse(builder_dir, settings)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  if builder.records and not os.path.exists(index_path):  # Freshly built: write the index.
    packed = []
    for split in sorted({r.split for r in builder.records}):
      in_split = [r for r in builder.records if r.split == split]
      packed += [dataclasses.replace(r, packed=(builder_dir, tfds_split(split), i))
                 for i, r in enumerate(in_split)]

    def write_index(f):
      for r in packed:
        d = r.to_json()
        d["packed"] = [d["packed"][1], d["packed"][2]]  # The dir is taken at read time.
        f.write(json.dumps(d) + "\n")

    files.atomic_write(index_path, write_index, binary=False)
    report = builder.scan_report
    skipped = [{"file": f, "reason": why} for f, why in (report.skipped if report else [])]
    if skipped:
      log.warning("packed %d of %d %s records: skipped %d unreadable (%s); the list is in %s",
                  len(builder.records), report.checked, fmt, len(skipped),
                  "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3]),
                  os.path.join(builder_dir, SETTINGS_FILE))
    files.write_json(os.path.join(builder_dir, SETTINGS_FILE),
                          {**settings, "records": len(builder.records), "skipped": skipped})
  return builder_dir


def pack_summary(builder_dir: str) -> dict[str, Any]:
  """What a pack holds: its settings, the record count and the skipped files (if recorded)."""
  path = os.path.join(builder_dir, SETTINGS_FILE)
  return files.read_json(path) if os.path.isfile(path) else {}


def _check_reuse(builder_dir: str, settings: dict[str, Any]) -> None:
  """Refuses to hand back a finished pack made from another folder, classes or options: the
  builder directory depends only on the format, so TFDS would reuse it silently."""
  if not os.path.isfile(os.path.join(builder_dir, "dataset_info.json")):
    return
  done = pack_summary(builder_dir)
  if not done:
    log.warning("%s was packed by an older adjax without %s: reusing it unchecked",
                builder_dir, SETTINGS_FILE)
    return
  differ = [f"{k} ({done.get(k)!r} there, {v!r} asked)" for k, v in settings.items()
            if done.get(k) != v]
  if differ:
    raise ValueError(f"{builder_dir} already holds a pack made with other settings: "
                     f"{'; '.join(differ)}. Pack into another --out folder, or delete "
                     f"{builder_dir} to repack")


def packed_records(builder_dir: str) -> list[Record]:
  """The index of a packed dataset; its records read their bytes from the shards.

  Args:
    builder_dir: the directory `pack_dataset` returned (holding dataset_info.json and the
      .array_record shards); it may have been copied elsewhere since.

  Returns:
    the records, sorted like `records.build_index` output.
  """
  if not os.path.isfile(os.path.join(builder_dir, "dataset_info.json")):
    raise FileNotFoundError(f"{builder_dir!r} is not a packed dataset (no dataset_info.json)")
  index_path = os.path.join(builder_dir, INDEX_FILE)
  records = []
  if os.path.isfile(index_path):
    with open(index_path) as f:
      for line in f:
        d = json.loads(line)
        split, i = d.pop("packed")
        records.append(Record.from_json({**d, "packed": (builder_dir, split, int(i))}))
    return sorted(records)
  # No index file: read the fields from the shards (slower: reads the bytes too).
  builder = tfds.builder_from_directory(builder_dir)
  for split in builder.info.splits:
    source = builder.as_data_source(split=split)
    for i in range(len(source)):
      ex = source[i]
      fields = {k: (ex[k].decode() if isinstance(ex[k], bytes) else str(ex[k]))
                for k in _TEXT_FIELDS}
      fields["mask_path"] = fields["mask_path"] or None
      records.append(Record(label=int(ex["label"]), packed=(builder_dir, split, i), **fields))
  return sorted(records)
