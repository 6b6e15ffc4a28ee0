"""`adjax evaluate` on a `folder` dataset whose anomalous images have masks only in part: image
metrics over every test image, pixel metrics over the images with masks, the mask counts, the
per-image scores CSVs and the printed table; an MVTec AD folder missing a mask is refused unless
config.eval.masks_optional."""

from __future__ import annotations

import csv
import json
import os
import types

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from adjax import metrics as metrics_lib
from adjax.cli import main
from adjax.evaluate import loop as evaluate_lib

SIZE = 56
METHODS, KINDS = ("featurenorm", "patchcore"), ("original", "residual")


def _write(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **({"lossless": True} if path.endswith(".webp") else {}))


def _dataset(root, rng) -> dict[str, set[str]]:
  """Two classes: `alpha`, some of whose anomalous images have masks (PNG, `_mask` or not,
  nested, other formats), and `beta`, none of whose have. Returns the anomalous images with
  and without a mask."""
  masked, unmasked = set(), set()

  def image(defect=None):
    img = (rng.normal(120, 12, (SIZE, SIZE, 3))).clip(0, 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if defect is not None:
      y, x = defect
      img[y:y + 12, x:x + 12] = 250
      mask[y:y + 12, x:x + 12] = 255
    return img, mask

  for cls, n_masked in (("alpha", 4), ("beta", 0)):
    base = f"{root}/{cls}"
    for i in range(6):
      _write(f"{base}/train/good/{'lot2/' if i % 2 else ''}{i}.{'jpg' if i % 3 else 'png'}",
             image()[0])
    for i in range(4):
      _write(f"{base}/test/good/{i}.{'bmp' if i % 2 else 'png'}", image()[0])
    for i in range(6):
      kind = "spot" if i % 2 else "blob"
      img, mask = image((int(rng.integers(0, SIZE - 12)), int(rng.integers(0, SIZE - 12))))
      sub = "deep/" if i == 1 else ""
      path = f"{base}/test/{kind}/{sub}{i}.{'webp' if i == 3 else 'png'}"
      _write(path, img)
      if i < n_masked:
        _write(f"{base}/ground_truth/{kind}/{sub}{i}{'_mask' if i % 2 else ''}.png", mask)
        masked.add(path)
      else:
        unmasked.add(path)
  return {"masked": masked, "unmasked": unmasked}


ARGS = [f"--config.image_size={SIZE}", "--config.backbone.name=tiny-vit",
        "--config.train.dtype=float32", "--config.eval.shots=2", "--config.eval.tsne=false",
        "--config.eval.methods=" + ",".join(METHODS), "--config.eval.features=" + ",".join(KINDS)]


def _read_csv(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], [(p, int(label), float(score)) for p, label, score in rows[1:]]


def _parse_table(text):
  """The printed Markdown table: {method: {column: cell}}."""
  lines = [line for line in text.splitlines() if line.startswith("|")]
  head = [c.strip() for c in lines[0].strip("|").split("|")]
  out = {}
  for line in lines[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    out[cells[0]] = dict(zip(head[1:], cells[1:]))
  return out


def test_evaluate_a_folder_dataset_with_masks_in_part(tmp_path, monkeypatch, capsys):
  root, out = tmp_path / "data", tmp_path / "out"
  files = _dataset(str(root), np.random.default_rng(0))
  seen = []   # what each scoring got: its maps and masks, to check the pixel metrics against
  score_method = evaluate_lib.score_method

  def recording(name, settings, train, test, image_size, seed, labels, masks, **kw):
    got = score_method(name, settings, train, test, image_size, seed, labels, masks, **kw)
    seen.append((name, labels, masks, got))
    return got

  monkeypatch.setattr(evaluate_lib, "score_method", recording)
  assert main(["evaluate", "--out", str(out), "--config.eval.format=folder",
               f"--config.eval.root={root}", *ARGS]) == 0
  printed = capsys.readouterr().out
  with open(out / "results.json") as f:
    summary = json.load(f)
  assert summary["classes"] == ["alpha", "beta"]
  assert not (out / ".adjax.lock").exists()   # held while it wrote, released at the end

  # The counts, from the tree as written.
  assert summary["mask_counts"] == {
      "alpha": {"test_images": 10, "anomalous_images": 6, "anomalous_with_masks": 4,
                "images_with_masks": 8},
      "beta": {"test_images": 10, "anomalous_images": 6, "anomalous_with_masks": 0,
               "images_with_masks": 4}}

  # One CSV per method and kind, every test image of every class once, labels from the tree.
  anomalous = files["masked"] | files["unmasked"]
  for method in METHODS:
    for kind in KINDS:
      header, rows = _read_csv(out / f"scores_{method}_{kind}.csv")
      assert header == ["path", "label", "score"]
      paths = [p for p, _, _ in rows]
      assert len(paths) == len(set(paths)) == 20
      assert {p for p, label, _ in rows if label == 1} == anomalous
      assert all(("/test/good/" in p) == (label == 0) for p, label, _ in rows)
      for cls in summary["classes"]:
        mine = [(label, s) for p, label, s in rows if f"/{cls}/" in p]
        want = roc_auc_score([label for label, _ in mine], [s for _, s in mine])
        assert summary["results"][method][cls][kind]["image_auroc"] == pytest.approx(want,
                                                                                     abs=1e-12)

  # Pixel metrics over the images with masks only (normal ones included), none for beta.
  assert len(seen) == len(METHODS) * len(KINDS) * 2
  for i, (name, labels, masks, (metrics, scores, maps, _)) in enumerate(seen):
    cls = summary["classes"][i // (len(METHODS) * len(KINDS))]
    kind = KINDS[i % len(KINDS)]
    header, rows = _read_csv(out / f"scores_{name}_{kind}.csv")
    mine = [p for p, _, _ in rows if f"/{cls}/" in p]
    np.testing.assert_array_equal(scores, [s for p, _, s in rows if f"/{cls}/" in p])
    keep = np.array([p not in files["unmasked"] for p in mine])
    stored = summary["results"][name][cls][kind]
    if cls == "beta":
      assert not any(k.startswith("pixel_") for k in stored)
      continue
    want = metrics_lib.pixel_metrics(masks[keep], maps[keep])
    everything = metrics_lib.pixel_metrics(masks, maps)
    for k, v in want.items():
      assert stored[f"pixel_{k}"] == pytest.approx(v, abs=1e-12)
    # (the unmasked anomalies, scored high but counted as normal, would change them)
    assert want["auroc"] != everything["auroc"]
  # The means: pixel metrics of alpha alone.
  for method in METHODS:
    for kind in KINDS:
      assert summary["means"][method][kind]["pixel_aupro"] == pytest.approx(
          summary["results"][method]["alpha"][kind]["pixel_aupro"])

  # Printed: the mean table, readable, and where the rest is.
  assert "{" not in printed and len(printed.splitlines()) < 15
  table = _parse_table(printed)
  assert set(table) == set(METHODS)
  for method in METHODS:
    for kind in KINDS:
      for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        value = summary["means"][method][kind][metric]
        assert table[method][f"{kind} {metric.replace('_', ' ')}"] == f"{100 * value:.1f}"
  assert "pixel metrics over the 12 of 20 test images that have masks" in printed
  assert "none for beta" in printed
  assert printed.strip().endswith(f"results: {out / 'results.json'}")


def _mvtec_tree(root, rng):
  """One MVTec AD class (train/good, test/good, test/dent, ground_truth/dent/*_mask.png)."""
  for i in range(4):
    _write(f"{root}/tile/train/good/{i:03d}.png",
           rng.integers(0, 255, (SIZE, SIZE, 3)).astype(np.uint8))
  for i in range(2):
    _write(f"{root}/tile/test/good/{i:03d}.png",
           rng.integers(0, 255, (SIZE, SIZE, 3)).astype(np.uint8))
    _write(f"{root}/tile/test/dent/{i:03d}.png",
           rng.integers(0, 255, (SIZE, SIZE, 3)).astype(np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:20, 4:20] = 255
    _write(f"{root}/tile/ground_truth/dent/{i:03d}_mask.png", mask)


def test_an_mvtec_folder_missing_a_mask_needs_masks_optional(tmp_path, capsys):
  root, out = tmp_path / "mvtec", tmp_path / "out"
  _mvtec_tree(str(root), np.random.default_rng(1))
  os.remove(root / "tile/ground_truth/dent/001_mask.png")
  argv = ["evaluate", "--out", str(out), f"--config.eval.root={root}", *ARGS,
          "--config.eval.methods=featurenorm", "--config.eval.features=original"]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "001.png' has no mask" in err
  assert main(argv + ["--config.eval.masks_optional=true"]) == 0
  printed = capsys.readouterr().out
  with open(out / "results.json") as f:
    counts = json.load(f)["mask_counts"]["tile"]
  assert counts == {"test_images": 4, "anomalous_images": 2, "anomalous_with_masks": 1,
                    "images_with_masks": 3}
  assert "pixel metrics over the 3 of 4 test images that have masks" in printed
  header, rows = _read_csv(out / "scores_featurenorm_original.csv")
  assert [(os.path.relpath(p, root), label) for p, label, _ in rows] == [
      ("tile/test/good/000.png", 0), ("tile/test/good/001.png", 0),
      ("tile/test/dent/000.png", 1), ("tile/test/dent/001.png", 1)]


def test_tsne_leaves_out_anomalous_images_without_masks(tmp_path, monkeypatch):
  from adjax.evaluate import reporting
  drawn = {}
  monkeypatch.setattr(reporting, "plot_tsne",
                      lambda panels, path, **kw: drawn.update(panels=panels))
  rng = np.random.default_rng(0)
  levels = [rng.standard_normal((4, 2, 2, 3)).astype(np.float32)]
  masks = np.zeros((4, 8, 8), np.uint8)
  masks[0] = 1
  has_mask = np.array([True, False, True, True])   # image 1: anomalous, no mask
  evaluate_lib._tsne({"original": (levels, levels)}, ("original",), masks,
                     types.SimpleNamespace(level_strides=(4,)), str(tmp_path), "c",
                     types.SimpleNamespace(seed=0), has_mask=has_mask)
  tokens, labels = drawn["panels"]["original"]
  np.testing.assert_array_equal(tokens, levels[0][[0, 2, 3]].reshape(-1, 3))
  assert labels.tolist() == [1] * 4 + [0] * 8
