"""Colour augmentation against independent computations (colorsys, PIL, brute-force blur)."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from data_pipelines import augment


@pytest.fixture(scope="module")
def image():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)


def test_hsv_round_trip_and_hue_against_colorsys(image):
  x = image.astype(np.float64) / 255.0
  hsv = augment.rgb_to_hsv(x)
  want = np.array([colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3)]).reshape(hsv.shape)
  np.testing.assert_allclose(hsv, want, atol=1e-9)
  np.testing.assert_allclose(augment.hsv_to_rgb(hsv), x, atol=1e-9)
  shift = 0.37
  out = augment.adjust_hue(image.astype(np.float64), shift)
  want = np.array([colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
                   for h, s, v in want.reshape(-1, 3)]).reshape(out.shape) * 255
  np.testing.assert_allclose(out, want, atol=1e-6)


@pytest.mark.parametrize("factor", [0.6, 1.3])
def test_brightness_contrast_saturation_against_pil(image, factor):
  pil = Image.fromarray(image)
  x = image.astype(np.float32)
  # PIL's enhancers blend with black / mean luma / per-pixel luma, rounding to uint8 (and PIL
  # rounds its luma and mean), so agreement is within a couple of levels.
  for ours, theirs, tol in (
      (augment.adjust_brightness(x, factor), ImageEnhance.Brightness(pil), 1),
      (augment.adjust_contrast(x, factor), ImageEnhance.Contrast(pil), 2),
      (augment.adjust_saturation(x, factor), ImageEnhance.Color(pil), 2)):
    diff = np.abs(ours - np.asarray(theirs.enhance(factor), np.float32))
    assert diff.max() <= tol


def test_gaussian_blur_against_brute_force(image):
  sigma = 1.3
  x = image.astype(np.float64)
  radius = int(3.0 * sigma + 0.5)
  taps = np.arange(-radius, radius + 1)
  k1 = np.exp(-taps ** 2 / (2 * sigma ** 2))
  k1 /= k1.sum()
  # scipy's "reflect" repeats the edge pixel (numpy's "symmetric").
  padded = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="symmetric")
  want = np.zeros_like(x)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      want += k1[dy] * k1[dx] * padded[dy:dy + x.shape[0], dx:dx + x.shape[1]]
  np.testing.assert_allclose(augment.gaussian_blur(x, sigma), want, atol=1e-9)


def test_color_augment_seeded_and_probabilities(image):
  a = augment.color_augment(image, np.random.default_rng(5))
  b = augment.color_augment(image, np.random.default_rng(5))
  np.testing.assert_array_equal(a, b)
  assert a.shape == image.shape and a.dtype == np.uint8
  # Grayscale (R == G == B everywhere) happens with p = 0.2: 400 draws, binomial sd 0.02.
  gray = sum(np.all(out[..., 0] == out[..., 1]) & np.all(out[..., 1] == out[..., 2])
             for out in (augment.color_augment(image, np.random.default_rng(i))
                         for i in range(400)))
  assert 0.13 <= gray / 400 <= 0.27
  # With every probability 0 the image is unchanged.
  same = augment.color_augment(image, np.random.default_rng(1), jitter_p=0, grayscale_p=0,
                               blur_p=0)
  np.testing.assert_array_equal(same, image)
