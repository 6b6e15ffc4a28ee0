"""Colour augmentation of the pretraining views (docs/method.md section 5), in numpy, seeded.

The recipe is torchvision's: RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8),
RandomGrayscale(p=0.2), RandomApply(GaussianBlur(sigma in [0.1, 2]), p=0.5). The jitter factors
are drawn as torchvision draws them (brightness, contrast, saturation in [1 - x, 1 + x], hue in
[-x, x], the four applied in a random order) and the operations follow torchvision's tensor
formulas (ITU-R 601 luma for grayscale; contrast blends with the mean luma; hue rotates H in
HSV). The blur kernel is truncated at 3 sigma on each side (torchvision takes the kernel size
as an argument; the paper's size is not stated). Geometry is never changed, so both views of an
image stay aligned with its mask.

An augmentation is a draw (draw_color_params: the random choices, a small dict) and an
application (apply_color_params). data_pipelines/device_augment.py is the same math in JAX,
for augmenting inside the compiled train step; it takes the same dict.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def grayscale(x: np.ndarray) -> np.ndarray:
  """Luma (..., H, W) of a float RGB image (..., H, W, 3)."""
  return x @ _LUMA


def adjust_brightness(x: np.ndarray, factor: float) -> np.ndarray:
  """Scales intensities; x float in [0, 255]."""
  return np.clip(x * factor, 0.0, 255.0)


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
  """Blends with the image's mean luma."""
  mean = float(grayscale(x).mean())
  return np.clip(factor * x + (1.0 - factor) * mean, 0.0, 255.0)


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
  """Blends with the per-pixel luma."""
  gray = grayscale(x)[..., None]
  return np.clip(factor * x + (1.0 - factor) * gray, 0.0, 255.0)


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
  """RGB in [0, 1] to HSV in [0, 1] (hue as a fraction of a turn), as colorsys defines it."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  # Pairwise maximum/minimum: a reduction over a length-3 axis is several times slower.
  maxc = np.maximum(np.maximum(r, g), b)
  minc = np.minimum(np.minimum(r, g), b)
  delta = maxc - minc
  safe = np.where(delta > 0, delta, 1)
  s = delta / np.where(maxc > 0, maxc, 1)
  h = np.where(maxc == r, (g - b) / safe,
               np.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
  h = np.where(delta > 0, (h / 6) % 1, 0)
  return np.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(x: np.ndarray) -> np.ndarray:
  """HSV in [0, 1] to RGB in [0, 1]: channel n is v - v s clip(min(k, 4 - k), 0, 1) with
  k = (n + 6 h) mod 6 and n = 5, 3, 1 for R, G, B (the piecewise-linear hue wheel)."""
  h, s, v = x[..., 0], x[..., 1], x[..., 2]
  out = []
  for n in (5, 3, 1):
    k = (n + 6 * h) % 6
    out.append(v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1))
  return np.stack(out, axis=-1)


def adjust_hue(x: np.ndarray, shift: float) -> np.ndarray:
  """Rotates the hue by `shift` turns (in [-0.5, 0.5])."""
  hsv = rgb_to_hsv(x / 255.0)
  hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
  return np.clip(hsv_to_rgb(hsv) * 255.0, 0.0, 255.0)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur over H and W, kernel radius ceil(3 sigma), reflected borders."""
  return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect", truncate=3.0)


# The order in which apply_color_params runs the four jitter operations is a permutation of
# these indices (torchvision's ColorJitter order: brightness, contrast, saturation, hue).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def draw_color_params(rng: np.random.Generator, *,
                      jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
                      jitter_p: float = 0.8, grayscale_p: float = 0.2,
                      blur_sigma: tuple[float, float] = (0.1, 2.0), blur_p: float = 0.5
                      ) -> dict:
  """The random choices of one colour augmentation (see color_augment for the arguments).

  Returns:
    {"jitter": bool, "order": (4,) int permutation of JITTER_OPS, "brightness", "contrast",
    "saturation": factor, "hue": shift in turns, "grayscale": bool, "blur": bool,
    "sigma": float}; data_pipelines.device_augment.draw_color_params draws the same pytree in
    JAX.
  """
  # Draw every random number in a fixed order whether or not a step applies, so that one
  # step's probability does not shift the others' draws.
  u_jitter, u_gray, u_blur = rng.random(3)
  order = rng.permutation(4)
  b, c, s = (rng.uniform(max(0.0, 1 - j), 1 + j) for j in jitter[:3])
  h = rng.uniform(-jitter[3], jitter[3])
  sigma = rng.uniform(*blur_sigma)
  return {"jitter": bool(u_jitter < jitter_p), "order": order, "brightness": b,
          "contrast": c, "saturation": s, "hue": h, "grayscale": bool(u_gray < grayscale_p),
          "blur": bool(u_blur < blur_p), "sigma": sigma}


def apply_color_params(image: np.ndarray, params: dict) -> np.ndarray:
  """The colour augmentation `params` (from draw_color_params, numpy or JAX) of an image.

  Args:
    image: (H, W, 3) uint8.
    params: the drawn choices; numeric leaves may be numpy or JAX scalars.

  Returns:
    (H, W, 3) uint8.
  """
  x = image.astype(np.float32)
  # Python floats: a float64 numpy scalar would promote the float32 image to float64.
  factors = [float(params[name]) for name in JITTER_OPS]
  if bool(params["jitter"]):
    for op in np.asarray(params["order"]).tolist():
      if op == 0:
        x = adjust_brightness(x, factors[0])
      elif op == 1:
        x = adjust_contrast(x, factors[1])
      elif op == 2:
        x = adjust_saturation(x, factors[2])
      else:
        x = adjust_hue(x, factors[3])
  if bool(params["grayscale"]):
    x = np.repeat(grayscale(x)[..., None], 3, axis=-1)
  if bool(params["blur"]):
    x = gaussian_blur(x, float(params["sigma"]))
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def color_augment(image: np.ndarray, rng: np.random.Generator, *,
                  jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
                  jitter_p: float = 0.8, grayscale_p: float = 0.2,
                  blur_sigma: tuple[float, float] = (0.1, 2.0), blur_p: float = 0.5
                  ) -> np.ndarray:
  """One random colour augmentation of an image: apply_color_params(image,
  draw_color_params(rng, ...)).

  Args:
    image: (H, W, 3) uint8.
    rng: the generator that decides everything (same state, same output).
    jitter: brightness, contrast, saturation, hue strengths.
    jitter_p, grayscale_p, blur_p: probabilities of the three steps.
    blur_sigma: range of the blur's sigma.

  Returns:
    (H, W, 3) uint8.
  """
  params = draw_color_params(rng, jitter=jitter, jitter_p=jitter_p, grayscale_p=grayscale_p,
                             blur_sigma=blur_sigma, blur_p=blur_p)
  return apply_color_params(image, params)
