"""RealIAD reader: `<root>/<class>/OK/S0001/<class>_0001_OK_C1_<time>.jpg` and
`<root>/<class>/NG/<defect code>/S0001/<class>_0001_NG_<code>_C1_<time>.jpg` with the mask a
`.png` of the same stem beside the image; the camera view (C1..C5) is read from the file name.
An image under NG/ without a mask is a view in which the sample's defect is not visible: it is
a normal image (label 0, defect "good"), as the reference's reader labels it. (The reference
draws its reference images from OK/ only; here such views may also be drawn as references.)

When split files are present (`realiad_jsons/<class>.json` beside the root, or `json_dir`),
the split comes from them: {"meta": {"prefix": <class>, "normal_class": "OK"},
"train": [{"image_path", "mask_path", "anomaly_class"}, ...], "test": [...]}, paths relative to
root/prefix. Without them every record has split "all" (pretraining uses all images).
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

from data_pipelines.readers._common import (choose_classes, is_image, layout_error, subdirs,
                                            LayoutError)
from data_pipelines.records import Record

EXPECTED = "<class>/OK/<sample>/<name>_C<view>_<...>.jpg and " \
           "<class>/NG/<defect>/<sample>/<name>.jpg with a .png mask of the same stem"
_VIEW = re.compile(r"_(C\d+)(?:_|\.|$)")
_SAMPLE = re.compile(r"^S\d+$")


def _view_of(path: str) -> str:
  m = _VIEW.search(os.path.basename(path))
  if m is None:
    raise LayoutError(f"realiad: cannot read the camera view (_C1_.._C5_) from file name "
                      f"{path!r}")
  return m.group(1)


def _sample_of(path: str) -> str:
  parent = os.path.basename(os.path.dirname(path))
  return parent if _SAMPLE.match(parent) else ""


def _walk_images(folder: str) -> list[str]:
  """Image files (not .png masks) under a folder, recursively, sorted."""
  out = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames.sort()
    for n in sorted(filenames):
      if is_image(n) and not n.lower().endswith(".png"):
        out.append(os.path.join(dirpath, n))
  return out


def _json_file(root: str, cls: str, json_dir: str | None) -> str | None:
  if json_dir is not None:
    p = os.path.join(json_dir, f"{cls}.json")
    if not os.path.isfile(p):
      raise LayoutError(f"realiad split file {p!r} does not exist")
    return p
  parent = os.path.dirname(os.path.abspath(root))
  for cand in (os.path.join(parent, "realiad_jsons", f"{cls}.json"),
               os.path.join(parent, "realiad_jsons", "realiad_jsons", f"{cls}.json")):
    if os.path.isfile(cand):
      return cand
  return None


def _from_json(root: str, cls: str, path: str, masks_optional: bool) -> list[Record]:
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise LayoutError(f"realiad split file {path!r} is not valid JSON: {e}") from e
  meta = data.get("meta", {})
  prefix = meta.get("prefix", cls)
  normal = meta.get("normal_class", "OK")
  records = []
  for split in ("train", "test"):
    for item in data.get(split, []):
      try:
        image = os.path.join(root, prefix, item["image_path"])
        kind = item["anomaly_class"]
      except KeyError as e:
        raise LayoutError(f"realiad split file {path!r}: an item lacks {e}: {item}") from e
      if not os.path.isfile(image):
        raise LayoutError(f"realiad split file {path!r} names missing image {image!r}")
      label = int(kind != normal)
      mask = None
      if label:
        rel = item.get("mask_path")
        mask = os.path.join(root, prefix, rel) if rel else os.path.splitext(image)[0] + ".png"
        if not os.path.isfile(mask):
          if not masks_optional:
            raise LayoutError(f"realiad: anomalous image {image!r} has no mask {mask!r}")
          mask = None
      records.append(Record("realiad", cls, _view_of(image), split, label,
                            kind if label else "good", image, mask, _sample_of(image)))
  return records


def read(root: str, classes: Sequence[str] | None = None,
         json_dir: str | None = None, use_json: bool = True,
         masks_optional: bool = False) -> list[Record]:
  """RealIAD records.

  Args:
    root: the image folder holding one folder per class (e.g. realiad_512).
    classes: classes to keep, None for all found.
    json_dir: folder with <class>.json split files (e.g. realiad_jsons_sv); default: look for
      realiad_jsons/ beside the root.
    use_json: False ignores split files (every record has split "all").
    masks_optional: keep an anomalous image of a split file whose mask is not there
      (mask_path None). (Without split files an NG image without a mask is a normal view.)

  Returns:
    unsorted records.
  """
  found = [c for c in subdirs(root)
           if os.path.isdir(os.path.join(root, c, "OK"))
           or os.path.isdir(os.path.join(root, c, "NG"))]
  if not found:
    raise layout_error("realiad", root, EXPECTED)
  records = []
  for cls in choose_classes("realiad", root, found, classes):
    js = _json_file(root, cls, json_dir) if use_json else None
    if js is not None:
      records.extend(_from_json(root, cls, js, masks_optional))
      continue
    base = os.path.join(root, cls)
    ok = _walk_images(os.path.join(base, "OK"))
    ng_dir = os.path.join(base, "NG")
    if not ok and not _walk_images(ng_dir):
      raise layout_error("realiad", root, EXPECTED, base)
    for p in ok:
      records.append(Record("realiad", cls, _view_of(p), "all", 0, "good", p, None,
                            _sample_of(p)))
    for code in subdirs(ng_dir):
      for p in _walk_images(os.path.join(ng_dir, code)):
        mask = os.path.splitext(p)[0] + ".png"
        if os.path.isfile(mask):
          records.append(Record("realiad", cls, _view_of(p), "all", 1, code, p, mask,
                                _sample_of(p)))
        else:
          # A defect is often visible in only some of a sample's five views; the views
          # without it have no mask and are normal images, as the reference labels them.
          records.append(Record("realiad", cls, _view_of(p), "all", 0, "good", p, None,
                                _sample_of(p)))
  return records
