"""Image and mask decoding, mode conversion, resize + centre crop, and bad-file handling.

Every image that enters adjax goes through `decode_image` (any PIL mode to RGB uint8) and every
mask through `decode_mask` (any mode to a boolean array, non-zero = anomalous). Resizing follows
docs/method.md section 1 the way torchvision does it on PIL images: the short side to `size` with
bicubic
(PIL's antialiased filter), the long side to int(size * long / short), then a centre crop whose
offset is round((side - size) / 2). Masks are binarised first and resized with nearest neighbour
so they stay binary.

Bytes come either from the file named by a record or from packed ArrayRecord shards
(`Record.packed`), through `read_record_bytes`; the two give identical bytes, so identical
arrays.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from typing import Sequence

import numpy as np
from PIL import Image

from data_pipelines.records import Record

# Pillow refuses images above ~179 MP by default (decompression bombs); industrial photographs
# are far below that, so the default guard stays on.


class ImageDecodeError(ValueError):
  """An image or mask file that cannot be read or decoded."""


def _open(data: bytes, path: str) -> Image.Image:
  return _open_scaled(data, path)[0]


def _open_scaled(data: bytes, path: str, draft_short_side: int | None = None
                 ) -> tuple[Image.Image, tuple[int, int]]:
  """Opens and fully decodes an image, and gives its full (H, W). A JPEG with draft_short_side
  is decoded at the smallest scale (1/2, 1/4 or 1/8: libjpeg's DCT scaling) whose sides stay
  at least those of the image resized to that short side."""
  try:
    img = Image.open(io.BytesIO(data))
    full_hw = (img.size[1], img.size[0])
    if draft_short_side is not None and img.format == "JPEG":
      nh, nw = resized_shape(*full_hw, draft_short_side)
      img.draft(None, (nw, nh))  # None: keep the mode; only the scale changes
    img.load()  # Forces a full decode: a truncated file fails here, not later.
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageDecodeError(f"cannot decode image file {path!r}: {e}") from e
  return img, full_hw


def _to_uint8(arr: np.ndarray, mode: str, path: str) -> np.ndarray:
  """Maps a high-bit-depth single-channel array to 0..255."""
  if arr.dtype == np.uint8:
    return arr
  if arr.dtype == bool:
    return arr.astype(np.uint8) * 255
  if np.issubdtype(arr.dtype, np.integer):
    # 16-bit images (PIL modes I;16*, or I holding 16-bit data): full 16-bit range to 8 bits.
    # A fixed scale (not min-max) keeps the mapping independent of the image content.
    return (np.clip(arr.astype(np.int64), 0, 65535) // 257).astype(np.uint8)
  if np.issubdtype(arr.dtype, np.floating):
    # Mode F: assume [0, 1] when the data lie there, otherwise [0, 255].
    scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
    return np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
  raise ImageDecodeError(f"image file {path!r} has unsupported mode {mode} ({arr.dtype})")


def decode_image(data: bytes, path: str = "<bytes>") -> np.ndarray:
  """Decodes encoded image bytes to an RGB uint8 array.

  Grayscale, RGBA/LA (alpha dropped), palette, CMYK, 1-bit and 16-bit images are converted.

  Args:
    data: the encoded file (JPEG, PNG, BMP, TIFF, ...).
    path: the file name, used in error messages.

  Returns:
    (H, W, 3) uint8.

  Raises:
    ImageDecodeError: the bytes are not a decodable image (truncated, corrupt, empty).
  """
  return _decode_image(data, path)[0]


def _decode_image(data: bytes, path: str, draft_short_side: int | None = None
                  ) -> tuple[np.ndarray, tuple[int, int]]:
  """decode_image, optionally at a reduced JPEG scale (see _open_scaled); also returns the full
  image's (H, W), which the mask must match."""
  img, full_hw = _open_scaled(data, path, draft_short_side)
  mode = img.mode
  if mode in ("RGB",):
    arr = np.asarray(img)
  elif mode in ("L", "P", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX", "La"):
    arr = np.asarray(img.convert("RGB"))
  else:  # I;16, I;16B, I;16L, I, F: single channel with more than 8 bits.
    arr = _to_uint8(np.asarray(img), mode, path)
    if arr.ndim == 2:
      arr = np.repeat(arr[:, :, None], 3, axis=2)
  if arr.ndim != 3 or arr.shape[2] != 3:
    raise ImageDecodeError(
        f"image file {path!r} decoded to shape {arr.shape}, expected (H, W, 3)")
  return np.ascontiguousarray(arr, dtype=np.uint8), full_hw


def decode_mask(data: bytes, path: str = "<bytes>") -> np.ndarray:
  """Decodes a mask file to a boolean array: any non-zero pixel is anomalous.

  Palette masks are read by index (VisA stores class indices), colour masks are anomalous where
  any colour channel is non-zero (alpha is ignored).

  Args:
    data: the encoded mask file.
    path: the file name, used in error messages.

  Returns:
    (H, W) bool.
  """
  img = _open(data, path)
  arr = np.asarray(img)
  if arr.ndim == 3:
    channels = arr.shape[2]
    if img.mode in ("LA", "La", "PA"):
      arr = arr[:, :, 0]
    elif channels >= 3:
      arr = arr[:, :, :3].max(axis=2) if img.mode != "CMYK" else arr.max(axis=2)
    else:
      arr = arr.max(axis=2)
  return np.asarray(arr) != 0


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """(h, w) after resizing the short side to `size` as torchvision's Resize(int) does."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) of the centred size x size square, rounded as torchvision's
  CenterCrop."""
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return left, top, left + size, top + size


def resize_center_crop(image: np.ndarray, size: int, *, resample: int = Image.BICUBIC,
                       resize: int | None = None,
                       source_hw: tuple[int, int] | None = None) -> np.ndarray:
  """Resizes the short side to `resize` (default `size`) and centre-crops a `size` x `size`
  square.

  Args:
    image: (H, W, 3) or (H, W) uint8.
    size: output side in pixels.
    resample: PIL filter; bicubic for images, nearest for masks.
    resize: short side before the crop (e.g. 256 for the reference's Resize(256) +
      CenterCrop(224) of PatchCore and PaDiM on MVTec AD); None: `size` (docs/method.md section 1).
    source_hw: the (H, W) the image stands for when it was decoded at a reduced scale (JPEG
      draft): the resized shape and crop are those of the full image, so it stays aligned
      with its full-size mask. None: the image's own shape.

  Returns:
    (size, size, 3) or (size, size) uint8.
  """
  if size <= 0:
    raise ValueError(f"image_size must be positive, got {size}")
  resize = size if resize is None else resize
  if resize < size:
    raise ValueError(f"resize {resize} must be at least the crop size {size}")
  h, w = source_hw or image.shape[:2]
  nh, nw = resized_shape(h, w, resize)
  pil = Image.fromarray(image)
  if (nh, nw) != image.shape[:2]:
    pil = pil.resize((nw, nh), resample=resample)
  if (nh, nw) != (size, size):
    pil = pil.crop(center_crop_box(nh, nw, size))
  return np.asarray(pil)


def preprocess_pair(image_bytes: bytes, mask_bytes: bytes | None, size: int, *,
                    image_path: str = "<bytes>", mask_path: str = "<bytes>",
                    resize: int | None = None, jpeg_draft: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Decodes, checks and resizes an image and its mask.

  Args:
    image_bytes: encoded image.
    mask_bytes: encoded mask, or None for a normal image (an all-zero mask).
    size: output side (docs/method.md section 1: 224).
    image_path, mask_path: names for error messages.
    resize: short side before the centre crop (None: `size`; see resize_center_crop).
    jpeg_draft: decode a JPEG at 1/2, 1/4 or 1/8 scale when it stays at least the resized
      size (libjpeg's DCT scaling: a 512 px image for 224 decodes at 256, about 3x faster
      to decode and resize). Off by default: the pixels differ slightly from the full
      decode's (benchmarks/bench_pipeline.py measures by how much); the mask is unaffected.

  Returns:
    image (size, size, 3) uint8 and mask (size, size) uint8 in {0, 1}.

  Raises:
    ImageDecodeError: undecodable file, or a mask whose size differs from its image.
  """
  resize_to = size if resize is None else resize
  image, full_hw = _decode_image(image_bytes, image_path,
                                 draft_short_side=resize_to if jpeg_draft else None)
  out = resize_center_crop(image, size, resize=resize, source_hw=full_hw)
  if mask_bytes is None:
    return out, np.zeros((size, size), np.uint8)
  mask = decode_mask(mask_bytes, mask_path)
  if mask.shape != full_hw:
    raise ImageDecodeError(
        f"mask {mask_path!r} is {mask.shape[1]} x {mask.shape[0]} (W x H) but its image "
        f"{image_path!r} is {full_hw[1]} x {full_hw[0]}")
  mask = resize_center_crop(mask.astype(np.uint8) * 255, size, resample=Image.NEAREST,
                            resize=resize)
  return out, (mask > 127).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Reading bytes: from files, or from packed ArrayRecord shards (Record.packed).

_SOURCES: dict[tuple[str, str], object] = {}
_SOURCES_LOCK = threading.Lock()


def _packed_source(builder_dir: str, split: str):
  """Opens (once per process) the tfds data source of a packed dataset."""
  key = (builder_dir, split)
  with _SOURCES_LOCK:
    if key not in _SOURCES:
      import tensorflow_datasets as tfds  # Lazy: only packed data needs it.
      builder = tfds.builder_from_directory(builder_dir)
      _SOURCES[key] = builder.as_data_source(split=split)
    return _SOURCES[key]


def _read_file(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise ImageDecodeError(f"cannot read file {path!r}: {e}") from e


def read_record_bytes(record: Record) -> tuple[bytes, bytes | None]:
  """The encoded image and mask bytes of a record (mask None when it has no mask)."""
  if record.packed is not None:
    builder_dir, split, index = record.packed
    ex = _packed_source(builder_dir, split)[index]
    # The record says whether it has a mask; the stored bytes cannot (an empty mask file
    # and "no mask" both pack as zero bytes), and an empty mask must fail to decode, as it
    # does from the folder, not pass as an all-normal mask.
    mask = bytes(ex["mask_bytes"]) if record.mask_path else None
    return bytes(ex["image_bytes"]), mask
  image = _read_file(record.image_path)
  mask = _read_file(record.mask_path) if record.mask_path else None
  return image, mask


def load_record(record: Record, size: int, resize: int | None = None, *,
                jpeg_draft: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Reads, decodes and resizes a record's image and mask (see `preprocess_pair`)."""
  image_bytes, mask_bytes = read_record_bytes(record)
  return preprocess_pair(image_bytes, mask_bytes, size, image_path=record.image_path,
                         mask_path=record.mask_path or "", resize=resize,
                         jpeg_draft=jpeg_draft)


@dataclasses.dataclass
class ScanReport:
  """What `check_records` found: how many records were checked and which were skipped.

  `skipped` names each bad record by its image; `failed_files` (in the same order) names the
  file that failed, the image or its mask, and `bad_indices` its position in the records.
  """
  checked: int
  skipped: list[tuple[str, str]]  # (image file, reason)
  failed_files: list[str] = dataclasses.field(default_factory=list)
  bad_indices: list[int] = dataclasses.field(default_factory=list)

  @property
  def skipped_share(self) -> float:
    return len(self.skipped) / max(self.checked, 1)


def _check_record(rec: Record) -> tuple[str, str] | None:
  """(the failing file, why) when a record's image or mask cannot be read and decoded as
  training reads it; None when both can."""
  current = rec.image_path
  try:
    if rec.packed is None:  # read apart, so that a failure names the file that failed
      image_bytes = _read_file(rec.image_path)
      current = rec.mask_path or ""
      mask_bytes = _read_file(rec.mask_path) if rec.mask_path else None
    else:
      image_bytes, mask_bytes = read_record_bytes(rec)
    current = rec.image_path
    image = decode_image(image_bytes, rec.image_path)
    if mask_bytes is not None:
      current = rec.mask_path or ""
      mask = decode_mask(mask_bytes, current)
      if mask.shape != image.shape[:2]:
        raise ImageDecodeError(
            f"mask {rec.mask_path!r} is {mask.shape[1]} x {mask.shape[0]} (W x H) but its "
            f"image {rec.image_path!r} is {image.shape[1]} x {image.shape[0]}")
  except ImageDecodeError as e:
    return current, str(e)
  return None


def check_records(records: Sequence[Record], *, skip_bad: bool = False,
                  max_skip_share: float = 0.01, num_threads: int = 4,
                  progress: bool = False, desc: str = "check images"
                  ) -> tuple[list[Record], ScanReport]:
  """Decodes every image and mask once and drops (or reports) the bad ones.

  Args:
    records: records to check.
    skip_bad: if False the first bad file raises; if True bad records are dropped and counted.
    max_skip_share: with skip_bad, raise when more than this share of the records is bad (a
      wrong folder or a broken copy, not a few damaged files).
    num_threads: decoding threads (PIL releases the GIL while decoding).
    progress: a tqdm bar on stderr, one tick per record.
    desc: the bar's label.

  Returns:
    (the good records in their original order, a ScanReport).
  """
  from concurrent.futures import ThreadPoolExecutor

  from tqdm import tqdm

  def check(rec: Record) -> tuple[str, str] | None:
    failed = _check_record(rec)
    if failed is not None and not skip_bad:
      raise ImageDecodeError(failed[1])
    return failed

  with ThreadPoolExecutor(max(1, num_threads)) as pool, \
      tqdm(total=len(records), desc=desc, unit="image", dynamic_ncols=True,
           disable=not progress) as bar:
    results = []
    for failed in pool.map(check, records):  # in order: the report does not depend on timing
      results.append(failed)
      bar.update(1)
  bad = [i for i, failed in enumerate(results) if failed is not None]
  good = [r for r, failed in zip(records, results) if failed is None]
  report = ScanReport(len(records), [(records[i].image_path, results[i][1]) for i in bad],
                      [results[i][0] for i in bad], bad)
  if report.skipped_share > max_skip_share:
    first = "; ".join(f"{p}: {w}" for p, w in report.skipped[:3])
    raise ImageDecodeError(
        f"{len(report.skipped)} of {report.checked} images are unreadable "
        f"({report.skipped_share:.1%} > max_skip_share={max_skip_share:.1%}); first: {first}")
  return good, report
