"""GLASS's image-space texture anomalies: Perlin noise, masks, the blend, files and errors."""

import math

import numpy as np
import pytest
from PIL import Image

from data_pipelines import texture_anomalies as ta


def _perlin_by_hand(shape, cells, seed):
  """Perlin noise one pixel at a time from the textbook formula (same gradient draw)."""
  rng = np.random.default_rng(seed)
  angles = rng.uniform(0.0, 2 * math.pi, (cells[0] + 1, cells[1] + 1))
  fade = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3
  out = np.zeros(shape)
  for i in range(shape[0]):
    for j in range(shape[1]):
      y, x = i * cells[0] / shape[0], j * cells[1] / shape[1]
      y0, x0 = int(y), int(x)
      dots = {}
      for dy in (0, 1):
        for dx in (0, 1):
          a = angles[y0 + dy, x0 + dx]
          dots[dy, dx] = math.sin(a) * (y - y0 - dy) + math.cos(a) * (x - x0 - dx)
      u, v = fade(x - x0), fade(y - y0)
      top = dots[0, 0] + u * (dots[0, 1] - dots[0, 0])
      bottom = dots[1, 0] + u * (dots[1, 1] - dots[1, 0])
      out[i, j] = math.sqrt(2) * (top + v * (bottom - top))
  return out


@pytest.mark.parametrize("shape,cells", [((16, 24), (2, 4)), ((15, 10), (4, 1))])
def test_perlin_noise_matches_the_formula(shape, cells):
  got = ta.perlin_noise(shape, cells, np.random.default_rng(5))
  np.testing.assert_allclose(got, _perlin_by_hand(shape, cells, 5), atol=1e-6)
  # Zero on the lattice points, as gradient noise is.
  assert got[0, 0] == 0.0


def test_token_max_pool_and_masks():
  rng = np.random.default_rng(0)
  mask = (rng.uniform(size=(30, 30)) > 0.97).astype(np.float32)
  pooled = ta.token_max_pool(mask, (4, 4))     # 7 x 7 pixels a token, rows/cols 28, 29 dropped
  want = np.array([[mask[7 * i:7 * i + 7, 7 * j:7 * j + 7].max() for j in range(4)]
                   for i in range(4)])
  np.testing.assert_array_equal(pooled, want)
  for _ in range(10):
    image_mask, tokens = ta.anomaly_mask(56, (4, 4), rng)
    assert set(np.unique(image_mask)) <= {0.0, 1.0} and tokens.max() == 1.0
    np.testing.assert_array_equal(tokens, ta.token_max_pool(image_mask, (4, 4)))
  # A foreground keeps the defect on the object; an empty one is an error, not a hang.
  foreground = np.zeros((56, 56), bool)
  foreground[:, 28:] = True
  for _ in range(10):
    image_mask, tokens = ta.anomaly_mask(56, (4, 4), rng, foreground)
    assert not image_mask[:, :28].any() and not tokens[:, :2].any() and tokens.any()
  with pytest.raises(ValueError, match="foreground mask is empty"):
    ta.anomaly_mask(56, (4, 4), rng, np.zeros((56, 56), bool))


def test_masks_vary_in_size_and_shape():
  rng = np.random.default_rng(1)
  shares = [ta.anomaly_mask(64, (8, 8), rng)[0].mean() for _ in range(40)]
  assert min(shares) < 0.02 and max(shares) > 0.1   # from small blobs to large regions


def test_synthesize_blends_a_texture_under_the_mask(monkeypatch):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
  texture = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
  monkeypatch.setattr(ta, "prepare_texture", lambda path, size, rng, resize=None: texture)
  out, tokens = ta.synthesize(images, ["t.jpg"], (2, 2), np.random.default_rng(3), rounds=2)
  assert out.shape == (6, 28, 28, 3) and out.dtype == np.uint8 and tokens.shape == (6, 2, 2)
  betas = []
  for k in range(6):
    image = images[k % 3].astype(np.float64)
    changed = np.any(out[k] != images[k % 3], axis=-1)
    assert changed.any() and tokens[k].max() == 1
    # Changed pixels lie in set tokens (the token mask is the pooled image mask).
    token_of = ta.token_max_pool(changed.astype(np.float32), (2, 2))
    assert np.all(tokens[k] >= token_of)
    # One beta per copy: out = beta * image + (1 - beta) * texture where the mask is set.
    diff = texture.astype(np.float64) - image
    usable = changed[..., None] & (np.abs(diff) > 60)
    beta = 1 - np.median((out[k] - image)[usable] / diff[usable])
    assert 0.2 - 1e-2 <= beta <= 0.8 + 1e-2
    inside = changed[..., None] & np.ones_like(diff, bool)
    np.testing.assert_allclose(out[k][inside], np.rint(beta * image + (1 - beta) * texture)
                               [inside], atol=1.01 + 0.006 * 255)
    betas.append(beta)
  assert len(set(np.round(betas, 3))) > 1   # each copy draws its own
  again, _ = ta.synthesize(images, ["t.jpg"], (2, 2), np.random.default_rng(3), rounds=2)
  np.testing.assert_array_equal(out, again)
  with pytest.raises(ValueError, match="glass.texture_rounds must be >= 1"):
    ta.synthesize(images, ["t.jpg"], (2, 2), rng, rounds=0)


def test_textures_from_files(tmp_path):
  from skimage import data
  folder = tmp_path / "dtd" / "images"
  (folder / "bricks").mkdir(parents=True)
  (folder / "grassy").mkdir()
  Image.fromarray(data.brick()).save(folder / "bricks" / "brick_0001.jpg")
  Image.fromarray(data.grass()).convert("RGB").save(folder / "grassy" / "grass_0001.png")
  (folder / "notes.txt").write_text("not an image")
  paths = ta.list_textures(str(tmp_path / "dtd"))
  assert [p.rsplit("/", 1)[1] for p in paths] == ["brick_0001.jpg", "grass_0001.png"]
  patch = ta.prepare_texture(paths[0], 40, np.random.default_rng(0))
  assert patch.shape == (40, 40, 3) and patch.dtype == np.uint8 and patch.std() > 5
  with pytest.raises(FileNotFoundError, match=r"eval\.method_settings\.glass\.textures"):
    ta.list_textures(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no image file"):
    ta.list_textures(str(tmp_path / "empty"))


def test_foreground_masks_are_read_per_image(tmp_path):
  (tmp_path / "bottle").mkdir()
  mask = np.zeros((80, 80), np.uint8)
  mask[20:60, 20:60] = 255
  Image.fromarray(mask).save(tmp_path / "bottle" / "000.png")
  fg = ta.read_foreground(str(tmp_path), "bottle", "/data/mvtec/bottle/train/good/000.png", 40)
  assert fg.shape == (40, 40) and fg.dtype == bool
  assert fg[20, 20] and not fg[2, 2] and 0.2 < fg.mean() < 0.35
  with pytest.raises(FileNotFoundError, match="'bottle'"):
    ta.read_foreground(str(tmp_path), "bottle", "/data/x/001.png", 40)
  # A class without a mask folder (GLASS has none for textures): no restriction.
  assert ta.read_foreground(str(tmp_path), "carpet", "/data/x/000.png", 40) is None
  # Resized as the image when eval.resize differs from the crop: 80 -> 50, crop 40.
  zoomed = ta.read_foreground(str(tmp_path), "bottle", "/x/000.png", 40, resize=50)
  assert zoomed.shape == (40, 40) and zoomed.mean() > fg.mean()


def test_an_empty_foreground_lets_the_defect_go_anywhere(monkeypatch, caplog):
  import logging
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
  monkeypatch.setattr(ta, "prepare_texture", lambda path, size, rng, resize=None:
                      np.zeros((28, 28, 3), np.uint8))
  right_half = np.zeros((28, 28), bool)
  right_half[:, 14:] = True
  with caplog.at_level(logging.WARNING, logger="adjax.data"):
    out, tokens = ta.synthesize(images, ["t.jpg"], (2, 2), rng, rounds=3,
                                foregrounds=[right_half, np.zeros((28, 28), bool)])
  assert "training image 1: its foreground mask is empty" in caplog.text
  assert not tokens[0::2, :, 0].any()                 # image 0: right half only
  assert tokens[1::2].sum() > 0                        # image 1: anywhere


def test_texture_scale_follows_the_images_resize(tmp_path):
  # A texture of 8-pixel stripes: resized to 64 then cropped to 32, the stripes are 64/80 of
  # their width at resize 32 (80 -> 32 is 0.4; 80 -> 64 is 0.8).
  stripes = np.repeat((np.arange(80) // 8 % 2 * 255).astype(np.uint8), 1)[None, :, None]
  photo = np.broadcast_to(stripes, (80, 80, 3)).copy()
  Image.fromarray(photo).save(tmp_path / "stripes.png")
  widths = {}
  for resize in (None, 64):
    for seed in range(40):   # a draw without rotation or transposition keeps the stripes
      gen = np.random.default_rng(seed)
      patch = ta.prepare_texture(str(tmp_path / "stripes.png"), 32, gen, resize)
      row = patch[16, :, :].astype(int).mean(-1)
      if np.ptp(patch[:, 16].astype(int)) == 0 and np.ptp(row) > 100:
        edges = np.flatnonzero(np.diff(row > row.mean()))
        widths[resize] = np.median(np.diff(edges))
        break
  assert widths[None] == pytest.approx(8 * 32 / 80, abs=0.6)
  assert widths[64] == pytest.approx(8 * 64 / 80, abs=0.6)


def test_a_panorama_texture_is_cut_before_resizing(tmp_path):
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 4000, 3), dtype=np.uint8)
                  ).save(tmp_path / "wide.png")
  patch = ta.prepare_texture(str(tmp_path / "wide.png"), 24, np.random.default_rng(0))
  assert patch.shape == (24, 24, 3)


def test_texture_resize_truncates_as_torchvision(tmp_path, monkeypatch):
  """GLASS resizes the texture with torchvision's Resize(int): the long side is truncated
  (70 x 100 to 32: 32 x 45, where rounding gives 46), then centre-cropped."""
  photo = np.random.default_rng(1).integers(0, 256, (70, 100, 3), dtype=np.uint8)
  Image.fromarray(photo).save(tmp_path / "t.png")
  monkeypatch.setattr(ta, "_texture_changes", lambda rng: [lambda im: im] * 3)
  patch = ta.prepare_texture(str(tmp_path / "t.png"), 24, np.random.default_rng(0), 32)
  resized = Image.fromarray(photo).resize((45, 32), Image.BILINEAR)
  want = np.asarray(resized.crop((10, 4, 34, 28)))   # torchvision's CenterCrop rounding
  np.testing.assert_array_equal(patch, want)
