"""The embedded industrial dataset: real photographs from scikit-image with synthetic defects.

Each class is one photograph that scikit-image ships (brick, grass, gravel, the moon's surface,
cells, stained tissue, coins, a retina, ...), seen through small random crops: every image of a
class is a crop with a little random shift, rotation, zoom, gain and sensor noise, so normal
images vary as real production images do. Camera views (C1, C2, ...) look at different parts of
the photograph from a different angle. Anomalous images get one (evaluation) or one or two
(pretraining) synthetic defects of five kinds, with exact pixel masks:

  scratch  a thin curved line, lighter or darker than the surface   (RealIAD code HS)
  crack    a dark branching random walk                             (PS)
  stain    an irregular translucent blob of another colour          (ZW)
  patch    a piece cut from another image (or elsewhere, turned) pasted in   (YW)
  blend    a Perlin-noise shaped region blended with another texture (CH)

Defects cover mostly a small share of the image (about 0.1% to 8%, median near 1%) and vary in
size and contrast, but are visible: a nearest-neighbour detector on pretrained CNN features
separates them well.

Exactness: a defective image equals its clean image outside the mask, pixel for pixel (the
defect is composited with np.where(mask, defect, clean)); inside the mask nearly every pixel
changes. The evaluation set (MVTec AD layout) is PNG, so this holds in the files. The
pretraining set (RealIAD layout: mask .png beside the .jpg) stores images as JPEG quality 95
like RealIAD itself (4:4:4, no chroma subsampling), so its files differ from the rendered
arrays by JPEG noise (mean absolute error about 2 levels, up to about 15 at sharp edges); its
masks are exact PNGs.

Writing is atomic: everything is written under a temporary folder, moved into place, and the
marker `embedded.json` (parameters + summary) is written last; a folder with the marker and the
same parameters is reused, anything else is regenerated.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
import zlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.texture_anomalies import perlin_noise

MARKER = "embedded.json"
FORMAT_VERSION = 1
DEFECT_KINDS = ("scratch", "crack", "stain", "patch", "blend")
REALIAD_CODES = {"scratch": "HS", "crack": "PS", "stain": "ZW", "patch": "YW", "blend": "CH"}

# name: (scikit-image function, crop side as a share of the photo's short side, RGB tint for
# grayscale photos (None: the photo's own colours)).
CATALOG = {
    "brick": ("brick", 0.45, (1.0, 0.70, 0.55)),
    "grass": ("grass", 0.45, (0.62, 1.0, 0.50)),
    "gravel": ("gravel", 0.45, (0.92, 0.88, 0.78)),
    "regolith": ("moon", 0.40, (0.95, 0.93, 0.90)),
    "foam": ("cell", 0.40, (0.80, 0.92, 1.0)),
    "tissue": ("immunohistochemistry", 0.40, None),
    "fur": ("chelsea", 0.35, None),
    "print": ("page", 0.45, (0.95, 0.95, 0.88)),
    "coins": ("coins", 0.50, (1.0, 0.86, 0.62)),
    "fundus": ("retina", 0.25, None),
    "coffee": ("coffee", 0.55, None),
    "starfield": ("hubble_deep_field", 0.35, None),
    "textile": ("camera", 0.30, (0.75, 0.80, 0.95)),
}
PRETRAIN_CLASSES = ("brick", "grass", "gravel", "regolith", "foam", "tissue", "fur", "print")
EVAL_CLASSES = ("coins", "fundus", "coffee", "starfield", "textile")


def _key(*parts) -> list[int]:
  """Seed material from mixed ints and strings (strings by CRC32, stable across runs)."""
  return [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
  """The class's photograph as float32 RGB in [0, 255]."""
  import skimage.data  # Lazy: only generation needs it.
  fn, _, tint = CATALOG[name]
  img = np.asarray(getattr(skimage.data, fn)())
  if img.dtype == bool:
    img = img.astype(np.uint8) * 255
  img = img.astype(np.float32)
  if img.ndim == 2:
    t = np.array(tint or (1.0, 1.0, 1.0), np.float32)
    img = img[:, :, None] * t
  return np.clip(img[:, :, :3], 0, 255)


def _crop(photo: np.ndarray, size: int, centre: tuple[float, float], side: float,
          angle: float) -> np.ndarray:
  """An affine crop: a `side` square of the photo around `centre`, rotated, to size x size."""
  k = side / size
  c, s = np.cos(angle), np.sin(angle)
  a, b, d, e = k * c, -k * s, k * s, k * c
  half = size / 2.0
  cx, cy = centre
  data = (a, b, cx - a * half - b * half, d, e, cy - d * half - e * half)
  channels = [Image.fromarray(photo[:, :, i]).transform((size, size), Image.AFFINE, data,
                                                        resample=Image.BICUBIC)
              for i in range(3)]
  return np.stack([np.asarray(ch, np.float32) for ch in channels], axis=-1)


def _view_geometry(name: str, view: int, seed: int) -> tuple[float, float, float, float]:
  """Base centre (x, y), crop side and angle of a camera view of a class."""
  photo = _photo(name)
  h, w = photo.shape[:2]
  side = CATALOG[name][1] * min(h, w)
  margin = 0.75 * side  # > side / sqrt(2): a rotated crop stays inside the photo.
  rng = np.random.default_rng(_key(seed, "view", name, view))
  cx = rng.uniform(margin + 0.05 * side, w - margin - 0.05 * side)
  cy = rng.uniform(margin + 0.05 * side, h - margin - 0.05 * side)
  angle = (view % 4) * np.pi / 2 + rng.uniform(-0.2, 0.2)
  return cx, cy, side * (1.0 + 0.1 * (view % 2)), angle


def normal_image(name: str, view: int, index: int, *, image_size: int, seed: int = 0
                 ) -> np.ndarray:
  """A defect-free image of a class and view: a jittered crop with gain, bias and noise.

  Returns:
    (S, S, 3) float32 in [0, 255] (not yet rounded).
  """
  cx, cy, side, angle = _view_geometry(name, view, seed)
  photo = _photo(name)
  h, w = photo.shape[:2]
  rng = np.random.default_rng(_key(seed, "normal", name, view, index))
  jit = 0.04 * side
  scale = rng.uniform(0.95, 1.05)
  side_i = side * scale
  margin = 0.75 * side_i
  x = float(np.clip(cx + rng.uniform(-jit, jit), margin, w - margin))
  y = float(np.clip(cy + rng.uniform(-jit, jit), margin, h - margin))
  img = _crop(photo, image_size, (x, y), side_i, angle + rng.uniform(-0.07, 0.07))
  gain, bias = rng.uniform(0.92, 1.08), rng.uniform(-8, 8)
  img = img * gain + bias + rng.normal(0.0, 2.0, img.shape)
  return np.clip(img, 0, 255).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Defects. Each returns (defect image float32, mask bool); the caller composites.

def perlin(shape: tuple[int, int], res: int, rng: np.random.Generator) -> np.ndarray:
  """2D gradient (Perlin) noise in about [-0.7, 0.7], `res` cells along each side (the
  texture generator's noise at this set's original amplitude)."""
  return perlin_noise(shape, (res, res), rng).astype(np.float64) / np.sqrt(2.0)


def _line_mask(size: int, points: Sequence[tuple[float, float]], width: int) -> np.ndarray:
  canvas = Image.new("L", (size, size), 0)
  ImageDraw.Draw(canvas).line([tuple(map(float, p)) for p in points], fill=255, width=width,
                              joint="curve")
  return np.asarray(canvas) > 0


def _scratch(img, rng, size, foreign):
  length = rng.uniform(0.12, 0.45) * size
  theta = rng.uniform(0, np.pi)
  p0 = rng.uniform(0.1, 0.9, 2) * size
  p2 = p0 + length * np.array([np.cos(theta), np.sin(theta)])
  mid = (p0 + p2) / 2 + rng.uniform(-0.2, 0.2) * length * np.array([-np.sin(theta),
                                                                    np.cos(theta)])
  t = np.linspace(0, 1, 40)[:, None]
  pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * mid + t ** 2 * p2
  width = int(rng.integers(max(2, size // 112), max(3, size // 56) + 1))
  mask = _line_mask(size, pts, width)
  target = 255.0 if img[mask].mean() < 128 or rng.random() < 0.3 else 0.0
  strength = rng.uniform(0.45, 0.9)
  return img + strength * (target - img), mask


def _crack(img, rng, size, foreign):
  def walk(start, heading, steps):
    pts = [start]
    for _ in range(steps):
      heading += rng.uniform(-0.5, 0.5)
      step = rng.uniform(size / 45, size / 25)
      pts.append(pts[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    return pts
  width = int(max(2, round(size / 112)))
  main = walk(rng.uniform(0.15, 0.85, 2) * size, rng.uniform(0, 2 * np.pi),
              int(rng.integers(6, 16)))
  mask = _line_mask(size, main, width)
  if rng.random() < 0.5:
    j = int(rng.integers(1, len(main)))
    mask |= _line_mask(size, walk(main[j], rng.uniform(0, 2 * np.pi),
                                  int(rng.integers(3, 7))), max(1, width - 1))
  return img * rng.uniform(0.12, 0.45), mask


def _stain(img, rng, size, foreign):
  ry, rx = rng.uniform(0.035, 0.11, 2) * size
  cy, cx = rng.uniform(0.12, 0.88, 2) * size
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  dist = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
  dist = dist + 0.9 * perlin((size, size), int(rng.integers(4, 9)), rng)
  mask = dist < 1.0
  colour = rng.uniform(0, 255, 3).astype(np.float32)
  if rng.random() < 0.5:  # Dark, dirt-like.
    colour *= 0.3
  alpha = rng.uniform(0.35, 0.75) * (0.7 + 0.3 * np.clip(1.0 - dist, 0.0, 1.0))
  return img * (1 - alpha[..., None]) + colour * alpha[..., None], mask


def _patch(img, rng, size, foreign):
  ph, pw = (rng.uniform(0.06, 0.16, 2) * size).astype(int) + 2
  y0 = int(rng.integers(0, size - ph))
  x0 = int(rng.integers(0, size - pw))
  if rng.random() < 0.6:  # A foreign object.
    src = foreign
  else:  # The same surface from elsewhere, turned.
    src = np.rot90(img, int(rng.integers(1, 4)))
  sy = int(rng.integers(0, size - ph))
  sx = int(rng.integers(0, size - pw))
  piece = src[sy:sy + ph, sx:sx + pw] * rng.uniform(0.75, 1.25)
  mask = np.zeros((size, size), bool)
  if rng.random() < 0.5:
    yy, xx = np.mgrid[0:ph, 0:pw]
    shape = ((yy - (ph - 1) / 2) / (ph / 2)) ** 2 + ((xx - (pw - 1) / 2) / (pw / 2)) ** 2 <= 1
  else:
    shape = np.ones((ph, pw), bool)
  out = img.copy()
  out[y0:y0 + ph, x0:x0 + pw] = piece
  mask[y0:y0 + ph, x0:x0 + pw] = shape
  return out, mask


def _blend(img, rng, size, foreign):
  noise = perlin((size, size), int(rng.choice([4, 8, 16])), rng)
  cy, cx = rng.uniform(0.15, 0.85, 2) * size
  r = rng.uniform(0.06, 0.15) * size
  yy, xx = np.mgrid[0:size, 0:size]
  window = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
  mask = (noise > rng.uniform(-0.1, 0.15)) & window
  beta = rng.uniform(0.4, 0.85)
  return img * (1 - beta) + foreign * beta, mask


_DEFECTS = {"scratch": _scratch, "crack": _crack, "stain": _stain, "patch": _patch,
            "blend": _blend}


def add_defect(clean: np.ndarray, kind: str, rng: np.random.Generator,
               foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Adds one defect to a uint8 image.

  Args:
    clean: (S, S, 3) uint8.
    kind: one of DEFECT_KINDS.
    rng: decides everything about the defect.
    foreign: (S, S, 3) float32, an image of another class (texture for patch / blend).

  Returns:
    (defective uint8 equal to `clean` outside the mask, mask bool (S, S)); the mask covers
    between 0.08% and 12% of the image (redrawn otherwise).
  """
  size = clean.shape[0]
  img = clean.astype(np.float32)
  for _ in range(50):
    out, mask = _DEFECTS[kind](img, rng, size, foreign)
    share = mask.mean()
    if 0.0008 <= share <= 0.12:
      break
  else:
    raise RuntimeError(f"could not draw a {kind} defect of a sensible size")
  out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
  return np.where(mask[..., None], out, clean), mask


def render(name: str, view: int, index: int, *, image_size: int, seed: int = 0,
           kinds: Sequence[str] = (), foreign_classes: Sequence[str] = ()
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One image of the dataset, clean and with the given defects.

  Args:
    name: class name (a CATALOG key).
    view: camera view index (0 for C1).
    index: image number within (class, view, role).
    image_size: S.
    seed: dataset seed.
    kinds: defect kinds to add (empty: a normal image).
    foreign_classes: classes whose images serve as foreign texture (not `name`).

  Returns:
    (clean uint8 (S, S, 3), defective uint8 (S, S, 3), mask bool (S, S)).
  """
  clean = np.rint(normal_image(name, view, index, image_size=image_size, seed=seed)
                  ).astype(np.uint8)
  out, mask = clean, np.zeros(clean.shape[:2], bool)
  rng = np.random.default_rng(_key(seed, "defect", name, view, index))
  others = [c for c in (foreign_classes or CATALOG) if c != name]
  for kind in kinds:
    foreign_name = others[int(rng.integers(len(others)))]
    foreign = normal_image(foreign_name, int(rng.integers(2)), int(rng.integers(1000)),
                           image_size=image_size, seed=seed + 1)
    out, m = add_defect(out, kind, rng, foreign)
    mask |= m
  return clean, out, mask


def _save(array: np.ndarray, path: str, **kwargs) -> None:
  Image.fromarray(array).save(path, **kwargs)


def _resolve(classes, default: Sequence[str], what: str) -> list[str]:
  if isinstance(classes, int):
    if not 1 <= classes <= len(default):
      raise ValueError(f"{what}={classes}: between 1 and {len(default)} classes available")
    return list(default[:classes])
  classes = list(classes)
  unknown = sorted(set(classes) - set(CATALOG))
  if unknown:
    raise ValueError(f"{what}: unknown classes {unknown}; available {sorted(CATALOG)}")
  return classes


def _write_pretrain(root: str, classes: list[str], *, image_size: int, samples: int,
                    n_views: int, anomalous_share: float, seed: int) -> dict:
  from tqdm import tqdm
  counts = {}
  for name in tqdm(classes, desc="embedded pretraining set", unit="class", dynamic_ncols=True):
    rng = np.random.default_rng(_key(seed, "plan", name))
    ng = rng.random(samples) < anomalous_share
    ng[int(rng.integers(samples))] = True  # At least one anomalous sample per class.
    n_ok = n_ng = 0
    for s in range(samples):
      sid = f"{s + 1:04d}"
      kinds = []
      if ng[s]:
        # One or two defect kinds per sample (its NG/<code> folder is the first kind's); each
        # view gets its own instance of them.
        r = np.random.default_rng(_key(seed, "kinds", name, s))
        kinds = [str(k) for k in
                 r.choice(DEFECT_KINDS, size=1 + int(r.random() < 0.2), replace=False)]
        code = REALIAD_CODES[kinds[0]]
      for v in range(n_views):
        view = f"C{v + 1}"
        stamp = f"2024010{v + 1}{s:06d}"
        if ng[s]:
          folder = os.path.join(root, name, "NG", code, f"S{sid}")
          stem = f"{name}_{sid}_NG_{code}_{view}_{stamp}"
        else:
          folder = os.path.join(root, name, "OK", f"S{sid}")
          stem = f"{name}_{sid}_OK_{view}_{stamp}"
        os.makedirs(folder, exist_ok=True)
        _, image, mask = render(name, v, s, image_size=image_size, seed=seed, kinds=kinds)
        _save(image, os.path.join(folder, stem + ".jpg"), quality=95, subsampling=0)
        if ng[s]:
          _save(mask.astype(np.uint8) * 255, os.path.join(folder, stem + ".png"))
          n_ng += 1
        else:
          n_ok += 1
    counts[name] = {"normal": n_ok, "anomalous": n_ng}
  return counts


def eval_plan(images_per_class: int) -> tuple[int, int, int]:
  """(train normals, test normals, test anomalies) of an evaluation class."""
  n_test_good = max(2, images_per_class // 2)
  n_test_bad = max(len(DEFECT_KINDS), images_per_class // 2)
  return images_per_class, n_test_good, n_test_bad


def eval_kind(seed: int, name: str, i: int) -> str:
  """The defect kind of the i-th anomalous test image of an evaluation class."""
  offset = int(np.random.default_rng(_key(seed, "evalkinds", name)).integers(5))
  return DEFECT_KINDS[(i + offset) % len(DEFECT_KINDS)]


def _write_eval(root: str, classes: list[str], *, image_size: int, images_per_class: int,
                seed: int) -> dict:
  counts = {}
  n_train, n_good, n_bad = eval_plan(images_per_class)
  from tqdm import tqdm
  for name in tqdm(classes, desc="embedded evaluation set", unit="class", dynamic_ncols=True):
    base = os.path.join(root, name)
    for sub in ("train/good", "test/good"):
      os.makedirs(os.path.join(base, sub), exist_ok=True)
    # Index ranges keep train, test-good and test-anomalous images distinct crops.
    for i in range(n_train):
      _, img, _ = render(name, 0, i, image_size=image_size, seed=seed)
      _save(img, os.path.join(base, "train", "good", f"{i:03d}.png"))
    for i in range(n_good):
      _, img, _ = render(name, 0, 10000 + i, image_size=image_size, seed=seed)
      _save(img, os.path.join(base, "test", "good", f"{i:03d}.png"))
    per_kind: dict[str, int] = {}
    for i in range(n_bad):
      kind = eval_kind(seed, name, i)
      j = per_kind.get(kind, 0)
      per_kind[kind] = j + 1
      os.makedirs(os.path.join(base, "test", kind), exist_ok=True)
      os.makedirs(os.path.join(base, "ground_truth", kind), exist_ok=True)
      _, img, mask = render(name, 0, 20000 + i, image_size=image_size, seed=seed, kinds=[kind])
      _save(img, os.path.join(base, "test", kind, f"{j:03d}.png"))
      _save(mask.astype(np.uint8) * 255,
            os.path.join(base, "ground_truth", kind, f"{j:03d}_mask.png"))
    counts[name] = {"train": n_train, "test_good": n_good, "test_anomalous": n_bad,
                    "defects": per_kind}
  return counts


def generate_embedded_dataset(out_dir: str, *, image_size: int = 224,
                              pretrain_classes: int | Sequence[str] = 6,
                              eval_classes: int | Sequence[str] = 4,
                              images_per_class: int = 32, n_views: int = 2,
                              anomalous_share: float = 1 / 3, seed: int = 0,
                              force: bool = False) -> dict:
  """Generates the embedded dataset (deterministic, idempotent, atomic).

  Args:
    out_dir: where to write; gets pretrain/ (RealIAD layout), eval/ (MVTec AD layout) and the
      marker embedded.json.
    image_size: side of the square images written.
    pretrain_classes: number of classes (taken from PRETRAIN_CLASSES) or their names.
    eval_classes: number of classes (taken from EVAL_CLASSES) or their names; none may be a
      pretraining class.
    images_per_class: pretraining samples per class (each seen from n_views views), and
      training normals per evaluation class (its test set has images_per_class // 2 normal and
      images_per_class // 2 (at least 5) anomalous images).
    n_views: camera views (C1..) per pretraining sample (at least 2 in the default layout).
    anomalous_share: share of anomalous pretraining samples (at least one per class).
    seed: the dataset's seed.
    force: regenerate even when a complete copy with these settings exists.

  Returns:
    summary dict: pretrain_root, eval_root, classes, views, counts, params, image formats,
    seconds, generated (False when an existing copy was reused).
  """
  pre = _resolve(pretrain_classes, PRETRAIN_CLASSES, "pretrain_classes")
  ev = _resolve(eval_classes, EVAL_CLASSES, "eval_classes")
  if set(pre) & set(ev):
    raise ValueError(f"evaluation classes {sorted(set(pre) & set(ev))} are also pretraining "
                     "classes; the evaluation set must hold unseen classes only")
  if image_size < 16 or images_per_class < 2 or n_views < 1:
    raise ValueError(f"need image_size >= 16, images_per_class >= 2, n_views >= 1; got "
                     f"{image_size}, {images_per_class}, {n_views}")
  params = {"format_version": FORMAT_VERSION, "image_size": image_size,
            "pretrain_classes": pre, "eval_classes": ev,
            "images_per_class": images_per_class, "n_views": n_views,
            "anomalous_share": anomalous_share, "seed": seed}
  out_dir = os.path.abspath(out_dir)
  marker = os.path.join(out_dir, MARKER)
  if not force and os.path.isfile(marker):
    with open(marker) as f:
      try:
        old = json.load(f)
      except json.JSONDecodeError:
        old = {}
    if old.get("params") == params and all(
        os.path.isdir(os.path.join(out_dir, d)) for d in ("pretrain", "eval")):
      return {**old, "generated": False}

  start = time.time()
  os.makedirs(out_dir, exist_ok=True)
  for stale in os.listdir(out_dir):  # Left over by an interrupted run.
    if stale.startswith(".embedded-tmp-"):
      shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)
  tmp = tempfile.mkdtemp(prefix=".embedded-tmp-", dir=out_dir)
  try:
    pre_counts = _write_pretrain(os.path.join(tmp, "pretrain"), pre, image_size=image_size,
                                 samples=images_per_class, n_views=n_views,
                                 anomalous_share=anomalous_share, seed=seed)
    ev_counts = _write_eval(os.path.join(tmp, "eval"), ev, image_size=image_size,
                            images_per_class=images_per_class, seed=seed)
    summary = {
        "params": params,
        "pretrain_root": os.path.join(out_dir, "pretrain"),
        "eval_root": os.path.join(out_dir, "eval"),
        "pretrain_classes": pre, "eval_classes": ev,
        "views": [f"C{v + 1}" for v in range(n_views)],
        "counts": {"pretrain": pre_counts, "eval": ev_counts},
        "image_format": {"pretrain": "JPEG quality 95 (masks PNG)", "eval": "PNG"},
        "sources": {c: "skimage.data." + CATALOG[c][0] for c in pre + ev},
    }
    # Swap in: the marker goes first (so a crash mid-swap leaves no marker) and last.
    if os.path.exists(marker):
      os.remove(marker)
    for d in ("pretrain", "eval"):
      dst = os.path.join(out_dir, d)
      if os.path.exists(dst):
        shutil.rmtree(dst)
      os.replace(os.path.join(tmp, d), dst)
    summary["seconds"] = round(time.time() - start, 2)
    marker_tmp = os.path.join(tmp, MARKER)
    with open(marker_tmp, "w") as f:
      json.dump(summary, f, indent=1)
    os.replace(marker_tmp, marker)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {**summary, "generated": True}
