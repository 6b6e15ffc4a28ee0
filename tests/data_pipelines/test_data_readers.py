"""Readers of every layout on tiny generated folders, the merged index, bad inputs, decoding."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import images
from data_pipelines.records import LayoutError
from data_pipelines.index import build_index, load_index, save_index, select
from data_pipelines.records import Record


def _img(path, size=(12, 10), value=100, mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arr = np.full((size[1], size[0], 3), value, np.uint8)
  im = Image.fromarray(arr)
  if mode != "RGB":
    im = im.convert(mode)
  im.save(path)
  return path


def _mask(path, size=(12, 10), box=(2, 2, 5, 5), value=255):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arr = np.zeros((size[1], size[0]), np.uint8)
  x0, y0, x1, y1 = box
  arr[y0:y1, x0:x1] = value
  Image.fromarray(arr).save(path)
  return path


def make_mvtec(root, classes=("bottle", "cable"), n_train=3, n_good=2, types=("crack",),
               n_bad=2):
  """Writes an MVTec AD tree; returns the expected records (independent of the reader)."""
  expected = []
  for c in classes:
    for i in range(n_train):
      expected.append(Record("mvtec", c, "", "train", 0, "good",
                             _img(f"{root}/{c}/train/good/{i:03d}.png")))
    for i in range(n_good):
      expected.append(Record("mvtec", c, "", "test", 0, "good",
                             _img(f"{root}/{c}/test/good/{i:03d}.png")))
    for t in types:
      for i in range(n_bad):
        expected.append(Record("mvtec", c, "", "test", 1, t,
                               _img(f"{root}/{c}/test/{t}/{i:03d}.png"),
                               _mask(f"{root}/{c}/ground_truth/{t}/{i:03d}_mask.png")))
  return sorted(expected)


def make_realiad(root, classes=("toy",), samples=3, views=(1, 2), ng=(1,), maskless_views=()):
  """maskless_views: views of the NG samples that show no defect (no mask: normal images)."""
  expected = []
  for c in classes:
    for s in range(1, samples + 1):
      for v in views:
        if s in ng:
          folder = f"{root}/{c}/NG/HS/S{s:04d}"
          stem = f"{c}_{s:04d}_NG_HS_C{v}_20230101"
          p = _img(f"{folder}/{stem}.jpg")
          if v in maskless_views:
            expected.append(Record("realiad", c, f"C{v}", "all", 0, "good", p, None,
                                   f"S{s:04d}"))
            continue
          m = _mask(f"{folder}/{stem}.png")
          expected.append(Record("realiad", c, f"C{v}", "all", 1, "HS", p, m, f"S{s:04d}"))
        else:
          folder = f"{root}/{c}/OK/S{s:04d}"
          p = _img(f"{folder}/{c}_{s:04d}_OK_C{v}_20230101.jpg")
          expected.append(Record("realiad", c, f"C{v}", "all", 0, "good", p, None,
                                 f"S{s:04d}"))
  return sorted(expected)


def test_mvtec_and_mpdd(tmp_path):
  expected = make_mvtec(str(tmp_path / "mvtec"))
  assert build_index([("mvtec", str(tmp_path / "mvtec"))]) == expected
  got = build_index([("mpdd", str(tmp_path / "mvtec"), ["cable"])])
  assert got == [dataclasses.replace(r, dataset="mpdd") for r in expected
                 if r.class_name == "cable"]


def test_realiad_folder_and_json(tmp_path):
  root = str(tmp_path / "realiad_512")
  expected = make_realiad(root)
  got = build_index([("realiad", root)])
  assert got == expected
  assert {r.view for r in got} == {"C1", "C2"}
  # Split files beside the root decide the split.
  entries = {"train": [], "test": []}
  for r in expected:
    rel = os.path.relpath(r.image_path, os.path.join(root, "toy"))
    item = {"image_path": rel, "anomaly_class": r.defect_type if r.label else "OK",
            "mask_path": os.path.relpath(r.mask_path, os.path.join(root, "toy"))
                         if r.mask_path else None}
    entries["train" if r.sample_id == "S0002" else "test"].append(item)
  os.makedirs(tmp_path / "realiad_jsons")
  with open(tmp_path / "realiad_jsons" / "toy.json", "w") as f:
    json.dump({"meta": {"prefix": "toy", "normal_class": "OK"}, **entries}, f)
  got = build_index([("realiad", root)])
  want = sorted(dataclasses.replace(r, split="train" if r.sample_id == "S0002" else "test")
                for r in expected)
  assert got == want


def test_realiad_ng_view_without_mask_is_normal(tmp_path):
  # Real-IAD: a defect seen by camera C1 may be invisible to C2, whose image has no mask.
  root = str(tmp_path / "realiad_512")
  expected = make_realiad(root, views=(1, 2), ng=(1,), maskless_views=(2,))
  got = build_index([("realiad", root)])
  assert got == expected
  ng_sample = [r for r in got if r.sample_id == "S0001"]
  assert [(r.view, r.label, r.defect_type) for r in ng_sample] == [("C1", 1, "HS"),
                                                                   ("C2", 0, "good")]


def test_visa(tmp_path):
  root = tmp_path / "visa"
  rows, expected = [], []
  for c in ("candle", "pcb1"):
    for i, (split, label) in enumerate([("train", "normal"), ("test", "normal"),
                                        ("test", "anomaly")]):
      img = _img(str(root / c / "Data/Images" / f"{i:03d}.JPG"))
      mask = (_mask(str(root / c / "Data/Masks" / f"{i:03d}.png"), value=3)
              if label == "anomaly" else "")
      rows.append({"object": c, "split": split, "label": label,
                   "image": os.path.relpath(img, root),
                   "mask": os.path.relpath(mask, root) if mask else ""})
      expected.append(Record("visa", c, "", split, int(label == "anomaly"),
                             "anomaly" if label == "anomaly" else "good", img, mask or None))
  os.makedirs(root / "split_csv")
  with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
    w = csv.DictWriter(f, ["object", "split", "label", "image", "mask"])
    w.writeheader()
    w.writerows(rows)
  assert build_index([("visa", str(root))]) == sorted(expected)
  # VisA masks hold class indices (3 here): binarised to 1.
  rec = [r for r in expected if r.label][0]
  _, mask = images.load_record(rec, 10)
  assert set(np.unique(mask)) == {0, 1}


def test_btad_bmp_and_png(tmp_path):
  root = tmp_path / "btad"
  expected = []
  for c, ext in (("01", ".bmp"), ("02", ".png")):
    expected.append(Record("btad", c, "", "train", 0, "good",
                           _img(str(root / c / "train/ok" / f"0000{ext}"))))
    expected.append(Record("btad", c, "", "test", 0, "good",
                           _img(str(root / c / "test/ok" / f"0001{ext}"))))
    expected.append(Record("btad", c, "", "test", 1, "ko",
                           _img(str(root / c / "test/ko" / f"0002{ext}")),
                           _mask(str(root / c / "ground_truth/ko" / "0002.png"))))
  assert build_index([("btad", str(root))]) == sorted(expected)


def test_mvtec3d_rgb_only(tmp_path):
  root = tmp_path / "m3d"
  c = "bagel"
  validation = Record("mvtec3d", c, "", "train", 0, "good",
                      _img(str(root / c / "validation/good/rgb/000.png")))
  expected = [
      Record("mvtec3d", c, "", "train", 0, "good", _img(str(root / c / "train/good/rgb/000.png"))),
      Record("mvtec3d", c, "", "test", 0, "good", _img(str(root / c / "test/good/rgb/000.png"))),
      Record("mvtec3d", c, "", "test", 1, "hole", _img(str(root / c / "test/hole/rgb/000.png")),
             _mask(str(root / c / "test/hole/gt/000.png"))),
  ]
  os.makedirs(root / c / "test/hole/xyz")
  (root / c / "test/hole/xyz/000.tiff").write_bytes(b"not read")
  # The reference trains on train/good only; validation/good joins on request.
  assert build_index([("mvtec3d", str(root))]) == sorted(expected)
  from data_pipelines.readers import mvtec3d
  assert sorted(mvtec3d.read(str(root), include_validation=True)) == sorted(expected + [validation])


def test_merged_index_and_selection(tmp_path):
  mv = make_mvtec(str(tmp_path / "mvtec"), classes=("bottle",))
  ri = make_realiad(str(tmp_path / "ri"))
  merged = build_index([("mvtec", str(tmp_path / "mvtec")), ("realiad", str(tmp_path / "ri"))])
  assert merged == sorted(mv + ri)
  assert select(merged, datasets=["realiad"]) == ri
  with pytest.raises(ValueError, match="class.*'nope'"):
    select(merged, classes=["nope"])
  save_index(merged, str(tmp_path / "index.jsonl"))
  assert load_index(str(tmp_path / "index.jsonl")) == merged


def test_bad_layouts(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing"):
    build_index([("mvtec", str(tmp_path / "missing"))])
  os.makedirs(tmp_path / "odd" / "something")
  with pytest.raises(LayoutError, match=r"mvtec layout: expected .*train/good.*something/"):
    build_index([("mvtec", str(tmp_path / "odd"))])
  with pytest.raises(LayoutError, match="realiad layout"):
    build_index([("realiad", str(tmp_path / "odd"))])
  with pytest.raises(ValueError, match="unknown dataset format 'kitti'"):
    build_index([("kitti", str(tmp_path / "odd"))])
  make_mvtec(str(tmp_path / "mv"), classes=("bottle",))
  with pytest.raises(LayoutError, match=r"classes \['screw'\] not found"):
    build_index([("mvtec", str(tmp_path / "mv"), ["screw"])])
  os.remove(tmp_path / "mv/bottle/ground_truth/crack/000_mask.png")
  with pytest.raises(LayoutError, match="000.png.*has no mask"):
    build_index([("mvtec", str(tmp_path / "mv"))])


def test_truncated_image_error_and_skip(tmp_path):
  recs = make_mvtec(str(tmp_path / "mv"), classes=("bottle",), n_train=8)
  bad = recs[0].image_path
  data = open(bad, "rb").read()
  with open(bad, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(images.ImageDecodeError, match=os.path.basename(bad)):
    images.load_record(recs[0], 8)
  with pytest.raises(images.ImageDecodeError, match=os.path.basename(bad)):
    images.check_records(recs)
  good, report = images.check_records(recs, skip_bad=True, max_skip_share=0.2)
  assert good == recs[1:] and [p for p, _ in report.skipped] == [bad]
  assert report.skipped_share == pytest.approx(1 / len(recs))
  with pytest.raises(images.ImageDecodeError, match="max_skip_share"):
    images.check_records(recs, skip_bad=True, max_skip_share=0.01)


def test_mask_size_mismatch_names_both(tmp_path):
  img = _img(str(tmp_path / "a.png"), size=(12, 10))
  mask = _mask(str(tmp_path / "a_mask.png"), size=(11, 10))
  rec = Record("mvtec", "x", "", "test", 1, "crack", img, mask)
  with pytest.raises(images.ImageDecodeError, match=r"a_mask.png.*11 x 10.*a.png.*12 x 10"):
    images.load_record(rec, 8)


def _encode(im: Image.Image, fmt="PNG") -> bytes:
  buf = io.BytesIO()
  im.save(buf, format=fmt)
  return buf.getvalue()


def test_mode_conversions():
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (6, 7), dtype=np.uint8)
  out = images.decode_image(_encode(Image.fromarray(gray)))
  np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, 2))
  rgba = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
  np.testing.assert_array_equal(images.decode_image(_encode(Image.fromarray(rgba))),
                                rgba[..., :3])
  # Palette: every index maps to its palette colour.
  palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
  idx = rng.integers(0, 256, (6, 7), dtype=np.uint8)
  p = Image.fromarray(idx, mode="P")
  p.putpalette(palette.flatten().tolist())
  np.testing.assert_array_equal(images.decode_image(_encode(p)), palette[idx])
  # 16-bit: the full 16-bit range maps onto 0..255 (v // 257).
  deep = rng.integers(0, 65536, (6, 7)).astype(np.uint16)
  out = images.decode_image(_encode(Image.fromarray(deep)))
  np.testing.assert_array_equal(out[..., 0], (deep.astype(np.int64) // 257).astype(np.uint8))
  # Masks: any non-zero value is anomalous, whatever the mode.
  m = np.array([[0, 1, 7], [255, 0, 0]], np.uint8)
  np.testing.assert_array_equal(images.decode_mask(_encode(Image.fromarray(m))), m > 0)
  rgbm = np.zeros((2, 3, 3), np.uint8)
  rgbm[0, 1, 2] = 5
  np.testing.assert_array_equal(images.decode_mask(_encode(Image.fromarray(rgbm))),
                                rgbm.max(2) > 0)
  with pytest.raises(images.ImageDecodeError, match="cannot decode image file 'x.png'"):
    images.decode_image(b"", "x.png")


def test_resize_and_center_crop_geometry():
  # torchvision Resize(s): short side s, long side int(s * long / short); CenterCrop offset
  # round((side - s) / 2). With s equal to the short side there is no resampling, so the crop
  # is a plain slice.
  img = np.arange(10 * 17 * 3, dtype=np.int64).reshape(10, 17, 3) % 251
  img = img.astype(np.uint8)
  out = images.resize_center_crop(img, 10)
  np.testing.assert_array_equal(out, img[:, 4:14])  # round(7 / 2) = 4 (round half to even).
  assert images.resized_shape(480, 640, 224) == (224, int(224 * 640 / 480))
  assert images.resized_shape(700, 300, 224) == (int(224 * 700 / 300), 224)
  # Bicubic downscale of a constant image stays constant; the mask stays binary.
  const = np.full((40, 60, 3), 77, np.uint8)
  np.testing.assert_array_equal(images.resize_center_crop(const, 14), np.full((14, 14, 3), 77))
  mask = np.zeros((40, 60), np.uint8)
  mask[10:30, 20:50] = 1
  data_img = _encode(Image.fromarray(const))
  data_mask = _encode(Image.fromarray(mask * 255))
  im, mk = images.preprocess_pair(data_img, data_mask, 20)
  assert im.shape == (20, 20, 3) and mk.shape == (20, 20) and set(np.unique(mk)) <= {0, 1}
  # Nearest: output pixel (i, j) of the 30 x 20 resize samples source pixel floor((i+.5)*2).
  ys = ((np.arange(20) + 0.5) * 40 / 20).astype(int)
  xs = ((np.arange(30) + 0.5) * 60 / 30).astype(int)
  np.testing.assert_array_equal(mk, mask[ys][:, xs][:, 5:25])
  # Resize(13) then CenterCrop(10) (the reference's 256 -> 224 for PatchCore and PaDiM on
  # MVTec): short side 13 by PIL bicubic, then the centre 10 x 10, offsets round(3 / 2) = 2 and
  # round((22 - 10) / 2) = 6.
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (10, 17, 3), dtype=np.uint8)
  want = np.asarray(Image.fromarray(img).resize((22, 13), Image.BICUBIC))[2:12, 6:16]
  np.testing.assert_array_equal(images.resize_center_crop(img, 10, resize=13), want)
  im, mk = images.preprocess_pair(data_img, data_mask, 20, resize=30)
  resized = np.asarray(Image.fromarray(mask * 255).resize((45, 30), Image.NEAREST)) > 127
  np.testing.assert_array_equal(mk, resized[5:25, 12:32])   # offsets 5 and round(25 / 2) = 12
  with pytest.raises(ValueError, match="resize 8 must be at least the crop size 10"):
    images.resize_center_crop(img, 10, resize=8)
