"""What `adjax predict` writes: predictions.csv, summary.json and, per image, a heat-map overlay
and a binary anomaly mask at the image's original size."""

from __future__ import annotations

import csv
import io
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from adjax.io import files
from data_pipelines.images import center_crop_box, resized_shape

CSV_COLUMNS = ("path", "score", "normalised_score", "anomalous")


def full_size_map(crop_map: np.ndarray, original_hw: Sequence[int], image_size: int,
                  resize: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
  """A map over the centre crop the detector saw, in the original image's pixels.

  The crop is the centred image_size square of the image resized to short side `resize`
  (data_pipelines.images.resize_center_crop); outside it nothing was inspected: the map there
  is its minimum and `inspected` is False.

  Returns:
    (map (H, W) float32, inspected (H, W) bool).
  """
  h, w = int(original_hw[0]), int(original_hw[1])
  nh, nw = resized_shape(h, w, resize or image_size)
  left, top, right, bottom = center_crop_box(nh, nw, image_size)
  y0, y1 = round(top * h / nh), round(bottom * h / nh)
  x0, x1 = round(left * w / nw), round(right * w / nw)
  y0, x0, y1, x1 = max(0, y0), max(0, x0), min(h, max(y1, y0 + 1)), min(w, max(x1, x0 + 1))
  region = Image.fromarray(np.asarray(crop_map, np.float32), mode="F").resize(
      (x1 - x0, y1 - y0), Image.BILINEAR)
  out = np.full((h, w), float(np.min(crop_map)), np.float32)
  out[y0:y1, x0:x1] = np.asarray(region)
  inspected = np.zeros((h, w), bool)
  inspected[y0:y1, x0:x1] = True
  return out, inspected


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def write_maps(out_dir: str, name: str, original: np.ndarray, crop_map: np.ndarray, *,
               image_size: int, resize: Optional[int], pixel_threshold: float,
               vmin: float, vmax: float) -> dict[str, str]:
  """`<out_dir>/maps/<name>.overlay.png` and `.mask.png` (255 where the map is above the pixel
  threshold); returns their paths."""
  from adjax.evaluate.reporting import overlay
  full, inspected = full_size_map(crop_map, original.shape[:2], image_size, resize)
  mask = ((full > pixel_threshold) & inspected).astype(np.uint8) * 255
  base = os.path.join(out_dir, "maps", name)
  paths = {"overlay": base + ".overlay.png", "mask": base + ".mask.png"}
  picture = overlay(original, full, vmin=vmin, vmax=vmax, mask=mask)
  files.atomic_write(paths["overlay"], lambda f: f.write(_png(picture)))
  files.atomic_write(paths["mask"], lambda f: f.write(_png(mask)))
  return paths


def map_names(paths: Sequence[str], inputs: Sequence[str]) -> dict[str, str]:
  """A distinct file name for every image's maps: its path below the input folder it was
  found in ('/' as '__'), or its file name; with several inputs, prefixed by the input's
  position."""
  names = {}
  for path in paths:
    for i, item in enumerate(inputs):
      if os.path.isdir(item) and os.path.abspath(path).startswith(
          os.path.abspath(item) + os.sep):
        rel = os.path.relpath(path, item)
        break
    else:
      i, rel = next((i for i, item in enumerate(inputs)
                     if os.path.abspath(item) == os.path.abspath(path)), 0), \
          os.path.basename(path)
    stem = os.path.splitext(rel)[0].replace(os.sep, "__")
    names[path] = f"{i}_{stem}" if len(inputs) > 1 else stem
  return names


def write_predictions(out_dir: str, rows: Sequence[tuple[str, float, float, bool]]) -> str:
  """predictions.csv (CSV_COLUMNS), written atomically; returns its path."""
  path = os.path.join(out_dir, "predictions.csv")

  def write(f):
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for image, score, norm, flag in rows:
      writer.writerow([image, repr(float(score)), f"{float(norm):.4f}", int(bool(flag))])

  files.atomic_write(path, write, binary=False)
  return path
