"""Image-space texture anomalies for GLASS (its "local anomaly synthesis"), on the host.

GLASS trains its discriminator against normal images with a texture pasted in: a texture
photograph (DTD's, in the reference) altered by three random photometric or geometric changes,
blended into the image with weight 1 - beta (beta ~ N(0.5, 0.1) clipped to [0.2, 0.8]) under a
Perlin-noise mask, optionally restricted to the object's foreground. The discriminator learns
on the token grid, so the mask is also max-pooled to it (a token is anomalous when any of its
pixels is).

The mask (as the reference draws it): two binary Perlin masks at image resolution, each from
noise with 2^a x 2^b cells (a, b uniform in {0..5}), rotated by an angle uniform in [-90, 90]
degrees and thresholded at 0.5; with probability 1/3 each, their union, their intersection,
or the first alone; drawn again until the token mask has a set token.

Everything here is numpy / PIL and seeded by a numpy Generator: the images are made once per
class before the method's training, then featurised like any other image.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from data_pipelines.images import (center_crop_box, decode_image, decode_mask,
                                   resize_center_crop, resized_shape)

log = logging.getLogger("adjax.data")

TEXTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
BETA_MEAN, BETA_STD, BETA_RANGE = 0.5, 0.1, (0.2, 0.8)
MAX_CELLS_LOG2 = 5          # noise cells per axis: 2^0 .. 2^5
MAX_MASK_DRAWS = 100        # a foreground that small is a user error, not a loop forever


def list_textures(root: str, what: str = "eval.method_settings.glass.textures") -> list[str]:
  """Texture image files under `root` (any depth, sorted), e.g. DTD's `images` folder; `what`
  names the setting in errors.

  Raises:
    FileNotFoundError: `root` is not a folder.
    ValueError: it holds no image file.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"texture folder {root!r} ({what}) does not exist; "
                            "expected a folder of texture photographs, e.g. DTD's dtd/images")
  found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root)
                 for name in names if name.lower().endswith(TEXTURE_SUFFIXES))
  if not found:
    raise ValueError(f"texture folder {root!r} ({what}) holds no image file "
                     f"({', '.join(TEXTURE_SUFFIXES)})")
  return found


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int],
                 rng: np.random.Generator) -> np.ndarray:
  """(H, W) float32 Perlin gradient noise with cells[0] x cells[1] lattice cells, about
  [-1, 1]; pixel i samples lattice coordinate i * cells / size (any size, divisible or not)."""
  height, width = shape
  angles = rng.uniform(0.0, 2 * math.pi, (cells[0] + 1, cells[1] + 1))
  grad_y, grad_x = np.sin(angles), np.cos(angles)
  y = np.arange(height) * cells[0] / height
  x = np.arange(width) * cells[1] / width
  y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
  fy, fx = (y - y0)[:, None], (x - x0)[None, :]

  def corner(dy: int, dx: int) -> np.ndarray:
    gy = grad_y[np.ix_(y0 + dy, x0 + dx)]
    gx = grad_x[np.ix_(y0 + dy, x0 + dx)]
    return gy * (fy - dy) + gx * (fx - dx)

  fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)
  u, v = fade(fx), fade(fy)
  top = corner(0, 0) * (1 - u) + corner(0, 1) * u
  bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
  return (math.sqrt(2.0) * (top * (1 - v) + bottom * v)).astype(np.float32)


def _binary_perlin(size: int, rng: np.random.Generator) -> np.ndarray:
  cells = (2 ** int(rng.integers(0, MAX_CELLS_LOG2 + 1)),
           2 ** int(rng.integers(0, MAX_CELLS_LOG2 + 1)))
  noise = perlin_noise((size, size), cells, rng)
  angle = float(rng.uniform(-90.0, 90.0))
  # Bilinear rotation about the centre; corners rotated in from outside are 0 (no defect).
  rotated = np.asarray(Image.fromarray(noise, mode="F").rotate(
      angle, resample=Image.BILINEAR, fillcolor=0.0))
  return (rotated > 0.5).astype(np.float32)


def token_max_pool(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """(S, S) -> grid: each token takes the max over its (S // h) x (S // w) pixels (the
  remainder rows and columns are dropped, as torch's max_pool2d does)."""
  rows, cols = mask.shape[0] // grid[0], mask.shape[1] // grid[1]
  cut = mask[:rows * grid[0], :cols * grid[1]]
  return cut.reshape(grid[0], rows, grid[1], cols).max(axis=(1, 3))


def anomaly_mask(size: int, grid: tuple[int, int], rng: np.random.Generator,
                 foreground: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
  """A texture mask at image resolution and on the token grid.

  Args:
    size: image side S.
    grid: the token grid (h, w) the discriminator sees.
    rng: numpy Generator.
    foreground: optional (S, S) bool: defects only on the object.

  Returns:
    ((S, S) float32 mask in {0, 1}, (h, w) float32 token mask with at least one set token).
  """
  for _ in range(MAX_MASK_DRAWS):
    first, second = _binary_perlin(size, rng), _binary_perlin(size, rng)
    pick = rng.uniform()
    if pick > 2 / 3:
      mask = np.maximum(first, second)
    elif pick > 1 / 3:
      mask = first * second
    else:
      mask = first
    if foreground is not None:
      mask = mask * foreground
    tokens = token_max_pool(mask, grid)
    if tokens.max() > 0:
      return mask, tokens
  raise ValueError(f"no texture mask with a set token in {MAX_MASK_DRAWS} draws: the "
                   "foreground mask is empty or almost so")


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
  hsv = np.asarray(image.convert("HSV")).copy()
  hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(shift * 255))) % 256).astype(np.uint8)
  return Image.fromarray(hsv, mode="HSV").convert("RGB")


def _texture_changes(rng: np.random.Generator) -> list:
  """The nine changes of which the reference applies three (distinct, random order)."""
  factor = lambda: float(rng.uniform(0.8, 1.2))
  return [
      lambda im: ImageEnhance.Contrast(im).enhance(factor()),
      lambda im: ImageEnhance.Brightness(im).enhance(factor()),
      lambda im: _shift_hue(ImageEnhance.Color(im).enhance(factor()),
                            float(rng.uniform(-0.2, 0.2))),
      ImageOps.mirror,
      ImageOps.flip,
      lambda im: ImageOps.grayscale(im).convert("RGB"),
      ImageOps.autocontrast,
      ImageOps.equalize,
      lambda im: im.rotate(float(rng.uniform(-45.0, 45.0)), resample=Image.NEAREST),
  ]


def prepare_texture(path: str, size: int, rng: np.random.Generator,
                    resize: Optional[int] = None) -> np.ndarray:
  """A texture file as an (S, S, 3) uint8 patch: short side resized to `resize` (default S,
  as the images), three random changes, centre crop to S.

  A photograph more than twice as long as it is wide is first cut to a centred 2:1 strip: a
  centre crop after a rotation of at most 45 degrees sees no further, and a panorama would
  otherwise be resized whole."""
  resize = size if resize is None else int(resize)
  with open(path, "rb") as f:
    data = f.read()
  rgb = decode_image(data, path)
  height, width = rgb.shape[:2]
  longest = 2 * min(height, width)
  if max(height, width) > longest:
    top, left = (height - min(height, longest)) // 2, (width - min(width, longest)) // 2
    height, width = min(height, longest), min(width, longest)
    rgb = rgb[top:top + height, left:left + width]
  new_height, new_width = resized_shape(height, width, resize)   # torchvision's Resize(int)
  image = Image.fromarray(rgb).resize((new_width, new_height), Image.BILINEAR)
  changes = _texture_changes(rng)
  for index in rng.choice(len(changes), 3, replace=False):
    image = changes[int(index)](image)
  crop = image.convert("RGB").crop(center_crop_box(image.height, image.width, size))
  return np.asarray(crop)


def read_foreground(root: str, class_name: str, image_path: str, size: int,
                    resize: Optional[int] = None) -> Optional[np.ndarray]:
  """GLASS's foreground mask of a training image, `<root>/<class>/<image file name>`, resized
  and cropped as the image: (S, S) bool, True on the object; None when the class has no
  mask folder (GLASS has none for texture classes: the defect may go anywhere).

  Raises:
    FileNotFoundError: the class has a mask folder but no mask for this image.
  """
  folder = os.path.join(root, class_name)
  if not os.path.isdir(folder):
    return None
  path = os.path.join(folder, os.path.basename(image_path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"foreground mask {path!r} (eval.method_settings.glass."
                            f"foreground) is missing: "
                            f"expected one mask per training image of class {class_name!r}, "
                            "named as the image")
  with open(path, "rb") as f:
    mask = decode_mask(f.read(), path)
  # Bilinear resize, then any positive value is foreground (the reference takes the ceiling).
  resized = resize_center_crop(mask.astype(np.uint8) * 255, size, resample=Image.BILINEAR,
                               resize=resize)
  return resized > 0


def synthesize(images: np.ndarray, texture_paths: Sequence[str], grid: tuple[int, int],
               rng: np.random.Generator, *, rounds: int = 1,
               foregrounds: Optional[Sequence[Optional[np.ndarray]]] = None,
               resize: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Texture-augmented copies of normal images.

  Args:
    images: (N, S, S, 3) uint8 normal images.
    texture_paths: texture files to draw from (uniformly, with replacement).
    grid: the token grid (h, w) of the masks returned.
    rng: numpy Generator.
    rounds: augmented copies of each image (each with its own texture, mask and beta).
    foregrounds: optional per-image (S, S) bool foreground masks (None for an image: no
      restriction; an empty mask counts as none, with a warning).
    resize: the short side textures are resized to before the crop (default S), as the images.

  Returns:
    ((rounds * N, S, S, 3) uint8 images, image i of round r at r * N + i;
     (rounds * N, h, w) float32 token masks).
  """
  if rounds < 1:
    raise ValueError(f"eval.method_settings.glass.texture_rounds must be >= 1, got {rounds}")
  if not texture_paths:
    raise ValueError("no texture files to synthesize anomalies from")
  size = images.shape[1]
  if foregrounds is not None:
    foregrounds = list(foregrounds)
    for i, foreground in enumerate(foregrounds):
      if foreground is not None and token_max_pool(foreground.astype(np.float32), grid).max() == 0:
        log.warning("training image %d: its foreground mask is empty; its texture anomalies go "
                    "anywhere", i)
        foregrounds[i] = None
  out_images = np.empty((rounds * len(images),) + images.shape[1:], np.uint8)
  out_masks = np.empty((rounds * len(images),) + tuple(grid), np.float32)
  for r in range(rounds):
    for i, image in enumerate(images):
      texture = prepare_texture(texture_paths[int(rng.integers(len(texture_paths)))], size, rng,
                                resize)
      mask, tokens = anomaly_mask(size, grid, rng,
                                  None if foregrounds is None else foregrounds[i])
      beta = float(np.clip(rng.normal(BETA_MEAN, BETA_STD), *BETA_RANGE))
      m = mask[..., None]
      blended = (image * (1 - m) + m * (beta * image + (1 - beta) * texture.astype(np.float32)))
      out_images[r * len(images) + i] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
      out_masks[r * len(images) + i] = tokens
  return out_images, out_masks
