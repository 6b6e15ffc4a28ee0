"""Result tables, heat-map overlays and the t-SNE figure."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from adjax.evaluate import reporting


def _results():
  rng = np.random.default_rng(0)
  out = {}
  for cls in ("bottle", "cable", "screw"):
    out[cls] = {kind: {"image_auroc": float(rng.random()), "pixel_aupro": float(rng.random())}
                for kind in ("original", "pretrained")}
  del out["screw"]["original"]["pixel_aupro"]  # a missing value stays missing
  return out


def test_tables(tmp_path):
  results = _results()
  paths = reporting.write_tables(results, tmp_path, stem="mvtec", title="MVTec AD")
  rows = list(csv.DictReader(paths["csv"].open()))
  by = {(r["class"], r["metric"]): r for r in rows}
  for cls, per_kind in results.items():
    for m in ("image_auroc", "pixel_aupro"):
      o = per_kind["original"].get(m, np.nan)
      p = per_kind["pretrained"][m]
      np.testing.assert_allclose(float(by[cls, m]["original"]), o)
      np.testing.assert_allclose(float(by[cls, m]["difference"]), p - o)
  # The mean row: each kind's mean over the classes that have it, then the difference.
  o_mean = np.mean([results["bottle"]["original"]["pixel_aupro"],
                    results["cable"]["original"]["pixel_aupro"]])
  p_mean = np.mean([results[c]["pretrained"]["pixel_aupro"] for c in results])
  np.testing.assert_allclose(float(by["mean", "pixel_aupro"]["original"]), o_mean)
  np.testing.assert_allclose(float(by["mean", "pixel_aupro"]["difference"]), p_mean - o_mean)
  data = json.loads(paths["json"].read_text())
  assert data["screw"]["pixel_aupro"]["original"] is None
  np.testing.assert_allclose(data["mean"]["image_auroc"]["pretrained"],
                             np.mean([results[c]["pretrained"]["image_auroc"] for c in results]))
  md = paths["md"].read_text()
  assert md.startswith("# MVTec AD")
  bottle = next(line for line in md.splitlines() if line.startswith("| bottle"))
  r = results["bottle"]
  d = r["pretrained"]["image_auroc"] - r["original"]["image_auroc"]
  assert (f"| {100 * r['original']['image_auroc']:.1f} | "
          f"{100 * r['pretrained']['image_auroc']:.1f} | {100 * d:+.1f} |") in bottle
  with pytest.raises(ValueError, match="feature kinds"):
    reporting.write_tables({"a": {"orig": {"x": 1.0}}}, tmp_path)


def test_overlays(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 255, (5, 16, 20, 3), dtype=np.uint8)
  maps = rng.random((5, 16, 20))
  maps[2, 4, 5] = 10.0  # the global maximum: fully "hot" in the colour map
  scores = np.array([0.3, 0.9, 0.5, 0.1, 0.7])
  masks = np.zeros((5, 16, 20))
  masks[:, 8:12, 8:12] = 1
  paths = reporting.save_overlays(images, maps, scores, tmp_path, num=2,
                                  names=list("abcde"), masks=masks)
  assert [p.name for p in paths] == ["highest_00_b.png", "highest_01_e.png",
                                     "lowest_00_d.png", "lowest_01_a.png"]
  img = np.asarray(Image.open(paths[0]))
  assert img.shape == (16, 40, 3)
  np.testing.assert_array_equal(img[:, :20], images[1])
  # Overlay pixel = 0.5 * image + 0.5 * colour(normalised score); at the hottest pixel the jet
  # colour map is dark red (0.5, 0, 0).
  from matplotlib import colormaps
  ov = reporting.overlay(images[2], maps[2], vmin=maps.min(), vmax=maps.max(), mask=masks[2])
  want = 0.5 * images[2, 4, 5] + 0.5 * np.asarray(colormaps["jet"](1.0)[:3]) * 255
  np.testing.assert_allclose(ov[4, 5], want, atol=1)
  assert (ov[8, 8] == 255).all()  # the mask's boundary is white


def test_tsne_figure(tmp_path):
  rng = np.random.default_rng(2)
  normal = rng.standard_normal((120, 16))
  anomalous = rng.standard_normal((40, 16)) + 6.0
  feats = np.concatenate([normal, anomalous])
  labels = np.r_[np.zeros(120), np.ones(40)]
  mixed = rng.standard_normal((160, 16))  # no structure: labels cannot separate
  out = reporting.plot_tsne({"original": (mixed, labels), "pretrained": (feats, labels)},
                            tmp_path / "tsne.png", max_points=100, seed=0,
                            max_iter=300)
  assert Image.open(tmp_path / "tsne.png").format == "PNG"

  def nn_accuracy(emb, lab):  # leave-one-out 1-NN label agreement in the embedding
    d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.mean(lab[np.argmin(d, 1)] == lab)

  emb, lab = out["pretrained"]
  assert emb.shape == (100, 2) and lab.sum() == 40
  assert nn_accuracy(emb, lab) > 0.95
  assert nn_accuracy(*out["original"]) < 0.9
