"""The `folder` reader (nested folders, any image format, masks optional, bad layouts) and
`masks_optional` in the published layouts' readers."""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import images
from data_pipelines.index import build_index, read_dataset
from data_pipelines.records import LayoutError, Record


def _img(path, size=(12, 10), value=100):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
  return str(path)


def _mask(path, size=(12, 10)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arr = np.zeros((size[1], size[0]), np.uint8)
  arr[2:5, 3:7] = 255
  Image.fromarray(arr).save(path)
  return str(path)


def make_folder(root) -> list[Record]:
  """A folder dataset of two classes, at several depths and in several formats, some anomalous
  images with masks (named in each accepted way), some without; the expected records, written
  down independently of the reader."""
  r = str(root)
  w = "widget"
  expected = [
      Record("folder", w, "", "train", 0, "good", _img(f"{r}/{w}/train/good/a.png")),
      Record("folder", w, "", "train", 0, "good", _img(f"{r}/{w}/train/good/day2/b.jpg")),
      Record("folder", w, "", "train", 0, "good", _img(f"{r}/{w}/train/good/c.webp")),
      Record("folder", w, "", "test", 0, "good", _img(f"{r}/{w}/test/good/d.bmp")),
      Record("folder", w, "", "test", 0, "good", _img(f"{r}/{w}/test/good/x/y/e.tiff")),
      # <stem>_mask.png beside the mirrored place
      Record("folder", w, "", "test", 1, "scratch", _img(f"{r}/{w}/test/scratch/001.png"),
             _mask(f"{r}/{w}/ground_truth/scratch/001_mask.png")),
      # <stem>.<other ext> in the mirrored sub-folder
      Record("folder", w, "", "test", 1, "scratch", _img(f"{r}/{w}/test/scratch/lot7/002.jpg"),
             _mask(f"{r}/{w}/ground_truth/scratch/lot7/002.png")),
      # no mask
      Record("folder", w, "", "test", 1, "scratch", _img(f"{r}/{w}/test/scratch/003.png")),
      # the only file of that stem, in another sub-folder, another format
      Record("folder", w, "", "test", 1, "dent", _img(f"{r}/{w}/test/dent/deep/004.jpeg"),
             _mask(f"{r}/{w}/ground_truth/dent/masks/004_mask.bmp")),
  ]
  g = "gadget"   # no ground_truth/ at all
  expected += [
      Record("folder", g, "", "train", 0, "good", _img(f"{r}/{g}/train/good/0.png")),
      Record("folder", g, "", "test", 0, "good", _img(f"{r}/{g}/test/good/1.png")),
      Record("folder", g, "", "test", 1, "broken", _img(f"{r}/{g}/test/broken/2.PNG")),
  ]
  # Not images: ignored.
  for junk in (f"{r}/{w}/train/good/notes.txt", f"{r}/{w}/test/scratch/.hidden.png"):
    with open(junk, "w") as f:
      f.write("x")
  return sorted(expected)


def test_folder_reader_nested_formats_and_optional_masks(tmp_path):
  expected = make_folder(tmp_path / "data")
  got = build_index([("folder", str(tmp_path / "data"))])
  assert got == expected
  assert [r.class_name for r in read_dataset("folder", str(tmp_path / "data"), ["gadget"])] \
      == ["gadget"] * 3
  # Every format decodes; a record without a mask loads an all-zero mask.
  for rec in got:
    image, mask = images.load_record(rec, 8)
    assert image.shape == (8, 8, 3) and mask.shape == (8, 8)
    assert bool(mask.any()) == (rec.mask_path is not None)


def test_folder_mask_of_an_ambiguous_stem_is_an_error(tmp_path):
  make_folder(tmp_path / "data")
  # Two masks of stem 003 elsewhere than the image's mirrored place: which one is meant?
  for sub in ("p", "q"):
    _mask(tmp_path / f"data/widget/ground_truth/scratch/{sub}/003.png")
  with pytest.raises(LayoutError, match=r"003.png' matches several masks by its stem '003'"):
    build_index([("folder", str(tmp_path / "data"))])


@pytest.mark.parametrize("breakage,message", [
    ("empty_class", r"class 'empty' has no train/good/.*empty'"),
    ("no_train_good", r"class 'widget' has no train/good/"),
    ("train_good_without_images", r"widget/train/good' holds no images"),
    ("no_test", r"class 'widget' has no test/"),
    ("test_without_images", r"widget/test' holds no images"),
    ("loose_test_image", r"widget/test' holds images outside a type folder \(\['z.png'\]\)"),
    ("single_class", r"this looks like a single class folder; pass its parent"),
    ("no_class", r"does not have the folder layout"),
])
def test_folder_bad_layouts_are_one_line_errors(tmp_path, breakage, message):
  import shutil
  root = tmp_path / "data"
  make_folder(root)
  w = root / "widget"
  if breakage == "empty_class":
    os.makedirs(root / "empty")
  elif breakage == "no_train_good":
    shutil.rmtree(w / "train" / "good")
  elif breakage == "train_good_without_images":
    shutil.rmtree(w / "train" / "good")
    os.makedirs(w / "train" / "good" / "sub")
  elif breakage == "no_test":
    shutil.rmtree(w / "test")
  elif breakage == "test_without_images":
    shutil.rmtree(w / "test")
    os.makedirs(w / "test" / "good")
  elif breakage == "loose_test_image":
    _img(w / "test" / "z.png")
  elif breakage == "single_class":
    root = w
  elif breakage == "no_class":
    root = tmp_path / "nothing"
    os.makedirs(root)
  with pytest.raises(LayoutError, match=message) as err:
    build_index([("folder", str(root))])
  assert "\n" not in str(err.value)


def _mvtec(root):
  expected = []
  for t, n in (("good", 2), ("crack", 2)):
    for i in range(n):
      path = _img(f"{root}/bottle/test/{t}/{i:03d}.png")
      mask = None if t == "good" else _mask(f"{root}/bottle/ground_truth/{t}/{i:03d}_mask.png")
      expected.append(Record("mvtec", "bottle", "", "test", int(t != "good"),
                             t, path, mask))
  expected.append(Record("mvtec", "bottle", "", "train", 0, "good",
                         _img(f"{root}/bottle/train/good/000.png")))
  return sorted(expected)


def test_published_layouts_keep_a_missing_mask_only_when_asked(tmp_path):
  # MVTec AD (and MPDD, which shares its reader): a missing mask is usually a broken download.
  expected = _mvtec(str(tmp_path / "mv"))
  lost = [r for r in expected if r.label][0]
  os.remove(lost.mask_path)
  with pytest.raises(LayoutError, match="000.png' has no mask"):
    read_dataset("mvtec", str(tmp_path / "mv"))
  kept = read_dataset("mvtec", str(tmp_path / "mv"), masks_optional=True)
  assert kept == sorted(dataclasses.replace(r, mask_path=None) if r == lost else r
                        for r in expected)
  # BTAD
  b = tmp_path / "btad" / "01"
  _img(b / "train/ok/0.bmp")
  _img(b / "test/ok/1.bmp")
  ko = _img(b / "test/ko/2.bmp")
  with pytest.raises(LayoutError, match="2.bmp' has no mask"):
    read_dataset("btad", str(tmp_path / "btad"))
  assert Record("btad", "01", "", "test", 1, "ko", ko) in \
      read_dataset("btad", str(tmp_path / "btad"), masks_optional=True)
  # MVTec 3D-AD
  m = tmp_path / "m3d" / "bagel"
  _img(m / "train/good/rgb/0.png")
  hole = _img(m / "test/hole/rgb/1.png")
  with pytest.raises(LayoutError, match="1.png' has no mask"):
    read_dataset("mvtec3d", str(tmp_path / "m3d"))
  assert read_dataset("mvtec3d", str(tmp_path / "m3d"), masks_optional=True)[0] == \
      Record("mvtec3d", "bagel", "", "test", 1, "hole", hole)
  # VisA: no mask given, or a mask named that is not there.
  v = tmp_path / "visa"
  rows = [("train", "normal", _img(v / "c/0.JPG"), ""),
          ("test", "anomaly", _img(v / "c/1.JPG"), ""),
          ("test", "anomaly", _img(v / "c/2.JPG"), "c/2.png")]
  os.makedirs(v / "split_csv")
  with open(v / "split_csv/1cls.csv", "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["object", "split", "label", "image", "mask"])
    out.writerows(["c", s, lab, os.path.relpath(p, v), m] for s, lab, p, m in rows)
  with pytest.raises(LayoutError, match="has no mask"):
    read_dataset("visa", str(v))
  got = read_dataset("visa", str(v), masks_optional=True)
  assert [(r.label, r.mask_path) for r in got] == [(1, None), (1, None), (0, None)]


def test_pretraining_refuses_anomalous_images_without_masks(tmp_path):
  # Its token labels come from the masks: such an image would be learnt as normal.
  from data_pipelines.pretrain_pipeline import PretrainPlan
  records = [r for r in make_folder(tmp_path / "data") if r.class_name == "widget"]
  plan = dict(batch_size=2, shots=(1,), max_shots=1, anomaly_share=None, seed=0,
              shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match=r"1 anomalous pretraining images have no mask \(e\.g\. "
                     r"'.*scratch/003.png'\)"):
    PretrainPlan(records, **plan)
  PretrainPlan([r for r in records if r.label == 0 or r.mask_path], **plan)
