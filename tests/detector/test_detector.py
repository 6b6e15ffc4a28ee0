"""adjax.Detector, `adjax fit` and `adjax predict`: every method fitted, saved and loaded back
with the same scores; predict's scores equal evaluate's on the same files; thresholds against a
brute force; tampered folders and weights refused; unreadable inputs skipped and named; the
exported program run without adjax."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from adjax.configs import default_config
from adjax.detector import Detector, storage, thresholds
from adjax.errors import UserError
from adjax.io import files
from data_pipelines.image_files import list_images, load_images

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 56


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  from data_pipelines.embedded import generate_embedded_dataset
  root = tmp_path_factory.mktemp("detector_data")
  summary = generate_embedded_dataset(str(root), image_size=SIZE, pretrain_classes=1,
                                      eval_classes=1, images_per_class=12)
  return os.path.join(summary["eval_root"], summary["eval_classes"][0])


def small_config():
  c = default_config()
  c.backbone.name = "tiny-vit"
  c.image_size = SIZE
  c.train.dtype = "float32"
  c.projector.num_heads = 4
  c.eval.shots = 2
  c.eval.method_settings = {"cflow": {"epochs": 1, "fiber_batch": 256, "image_batch": 4},
                            "uniad": {"epochs": 2, "neighbour_size": 3}, "glass": {"epochs": 1}}
  return c


# ----------------------------------------------------------------------- thresholds
def test_fpr_threshold_against_a_brute_force():
  rng = np.random.default_rng(0)
  for n, fpr in [(10, 0.01), (100, 0.05), (37, 0.2), (5, 0.0)]:
    scores = rng.normal(size=n)
    t = thresholds.fpr_threshold(scores, fpr)
    # The smallest score t with share(scores > t) <= fpr.
    ok = [s for s in scores if np.mean(scores > s) <= fpr]
    assert t == min(ok)


def test_f1_threshold_against_a_brute_force():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 60)
  scores = rng.normal(size=60) + labels
  t = thresholds.f1_threshold(scores, labels)

  def f1(cut):
    flag = scores > cut
    tp = np.sum(flag & (labels == 1))
    return 2 * tp / (flag.sum() + labels.sum())

  best = max(f1(c) for c in np.concatenate([scores, [scores.min() - 1]]))
  assert f1(t) == pytest.approx(best)
  with pytest.raises(ValueError, match="both normal and anomalous"):
    thresholds.f1_threshold(scores, np.zeros(60))


# ----------------------------------------------------------------------- every method
@pytest.mark.parametrize("method, kind", [
    ("patchcore", "original"), ("featurenorm", "residual"), ("padim", "original"),
    ("cflow", "residual"), ("uniad", "original"), ("glass", "original")])
def test_every_method_fits_saves_and_loads_with_the_same_scores(data, tmp_path, method, kind):
  detector = Detector.fit([os.path.join(data, "train", "good")], method=method, features=kind,
                          config=small_config())
  m = detector.manifest
  assert m["train"]["fit_images"] == 10 and m["validation"]["images"] == 2   # 20 % held out
  assert m["thresholds"]["validation_fpr"] <= m["thresholds"]["target_fpr"]
  path = detector.save(str(tmp_path / "det"))
  assert json.load(open(os.path.join(path, "manifest.json")))["method"] == method
  assert not any(name.startswith(".") for name in os.listdir(tmp_path))   # no partial folder
  loaded = Detector.load(path)
  test = load_images(list_images([os.path.join(data, "test")]), SIZE)
  want, want_maps, flags = detector.predict(test.images)
  got, got_maps, got_flags = loaded.predict(test.images)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_maps, want_maps)
  np.testing.assert_array_equal(got_flags, want > m["thresholds"]["image"])
  # An image's score does not depend on the images scored with it (CFLOW's would, were it
  # not calibrated on the training images).
  alone = np.concatenate([loaded.predict(test.images[i:i + 1])[0] for i in (0, 5)])
  np.testing.assert_allclose(alone, want[[0, 5]], rtol=1e-5)


# ----------------------------------------------------------------------- = evaluate
def test_predict_scores_equal_evaluate_scores(data, tmp_path):
  from adjax.evaluate import evaluate
  config = small_config()
  config.eval.format = "mvtec"
  config.eval.root = os.path.dirname(data)
  config.eval.methods = ("patchcore", "featurenorm")
  config.eval.features = ("original", "residual")
  config.eval.tsne = False
  out = str(tmp_path / "eval")
  evaluate(config, None, out, progress=False)
  for method in config.eval.methods:
    for kind in config.eval.features:
      with open(os.path.join(out, f"scores_{method}_{kind}.csv")) as f:
        want = {os.path.abspath(r["path"]): float(r["score"]) for r in csv.DictReader(f)}
      detector = Detector.fit([os.path.join(data, "train", "good")], method=method,
                              features=kind, config=small_config(),
                              val=os.path.join(data, "test", "good"))
      test = load_images(sorted(want), SIZE)
      scores, _, _ = detector.predict(test.images, batch=5)
      np.testing.assert_allclose(scores, [want[p] for p in test.paths], rtol=2e-5,
                                 err_msg=f"{method} {kind}")


# ----------------------------------------------------------------------- refusals
def test_tampered_or_incomplete_detectors_are_refused(data, tmp_path):
  detector = Detector.fit([os.path.join(data, "train", "good")], method="patchcore",
                          features="residual", config=small_config())
  path = detector.save(str(tmp_path / "det"))
  state = os.path.join(path, storage.STATE_FILE)
  raw = bytearray(open(state, "rb").read())
  raw[-1] ^= 0xFF
  open(state, "wb").write(bytes(raw))
  with pytest.raises(UserError, match=r"state\.safetensors: its SHA-256 .* differs"):
    Detector.load(path)
  detector.save(path)   # replaces the damaged detector as a whole
  os.remove(os.path.join(path, storage.REFERENCES_FILE))
  with pytest.raises(UserError, match=r"references\.safetensors: missing"):
    Detector.load(path)
  os.remove(os.path.join(path, storage.MANIFEST))
  with pytest.raises(UserError, match="manifest.json: missing"):
    Detector.load(path)
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="holds something other than a detector"):
    detector.save(str(other))
  assert (other / "notes.txt").read_text() == "mine"


def test_backbone_weights_are_checked_by_digest(tmp_path):
  weights = tmp_path / "w.pth"
  weights.write_bytes(b"weights one")
  manifest = {"backbone": {"name": "x", "weights": {
      "name": "w.pth", "path": str(weights),
      "sha256": files.file_sha256(str(weights))}}}
  assert storage.backbone_weights(manifest, None) == str(weights)
  moved = tmp_path / "elsewhere.pth"
  moved.write_bytes(b"weights one")
  assert storage.backbone_weights(manifest, str(moved)) == str(moved)
  moved.write_bytes(b"weights two")
  digest = files.file_sha256(str(moved))
  with pytest.raises(UserError, match=f"SHA-256 {digest} differs from the detector's "
                                      f"{manifest['backbone']['weights']['sha256']}"):
    storage.backbone_weights(manifest, str(moved))
  weights.unlink()
  with pytest.raises(UserError, match="not found; pass the same file with --weights"):
    storage.backbone_weights(manifest, None)


# ----------------------------------------------------------------------- the commands
def test_fit_and_predict_commands(data, tmp_path, capsys):
  from adjax.cli import main
  det, out = str(tmp_path / "det"), str(tmp_path / "pred")
  flags = ["--config.backbone.name=tiny-vit", f"--config.image_size={SIZE}",
           "--config.train.dtype=float32", "--config.projector.num_heads=4",
           "--config.eval.shots=2"]
  assert main(["fit", "--method", "patchcore", "--train", os.path.join(data, "train", "good"),
               "--out", det, "--export-program", "--program-batch", "4", *flags]) == 0
  fitted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert fitted["fit_images"] == 10
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  (inputs / "broken.png").write_bytes(b"not a png")
  wide = np.asarray(Image.open(os.path.join(data, "test", "good", "000.png")).convert("RGB"))
  wide = np.concatenate([wide, wide[:, :20]], axis=1)   # another size than the crop
  Image.fromarray(wide).save(inputs / "wide.png")
  assert main(["predict", "--detector", det, "--out", out, str(inputs),
               os.path.join(data, "test")]) == 0
  captured = capsys.readouterr()
  assert "broken.png" in captured.err
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["images"] == 13 and list(summary["unreadable"]) == [str(inputs / "broken.png")]
  with open(os.path.join(out, "predictions.csv")) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["path", "score", "normalised_score", "anomalous"]
  detector = Detector.load(det)
  for row in rows:
    assert int(row["anomalous"]) == (float(row["score"]) > detector.image_threshold)
  overlay = Image.open(os.path.join(out, "maps", "0_wide.overlay.png"))
  mask = np.asarray(Image.open(os.path.join(out, "maps", "0_wide.mask.png")))
  assert overlay.size == (wide.shape[1], wide.shape[0]) and mask.shape == wide.shape[:2]
  assert set(np.unique(mask)) <= {0, 255}
  # The exported program, run where adjax cannot be imported, gives predict's scores.
  test = load_images(list_images([os.path.join(data, "test")])[:4], SIZE)
  np.save(tmp_path / "images.npy", test.images)
  script = f"""
import importlib.abc, json, sys
class NoAdjax(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in ("adjax", "data_pipelines"):
      raise ImportError("adjax is not installed here")
sys.meta_path.insert(0, NoAdjax())
import jax, numpy as np
folder = {os.path.join(det, "program")!r}
info = json.load(open(folder + "/program.json"))
program = jax.export.deserialize(open(folder + "/program.jaxexport", "rb").read())
weights = np.load(folder + "/weights.npz")
scores, maps = program.call(*[weights[k] for k in info["weights"]],
                            np.load({str(tmp_path / "images.npy")!r}))
np.save({str(tmp_path / "scores.npy")!r}, np.asarray(scores))
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), detector.predict(test.images)[0],
                             rtol=1e-4)


def test_bad_fit_inputs_are_named(data, tmp_path):
  config = small_config()
  with pytest.raises(FileNotFoundError, match="--train /nonexistent: no such file or folder"):
    Detector.fit(["/nonexistent"], method="patchcore", config=config)
  with pytest.raises(UserError, match="--method: unknown method 'patchkore'"):
    Detector.fit([data], method="patchkore", config=config)
  with pytest.raises(UserError, match="--features pretrained needs --workdir"):
    Detector.fit([data], method="patchcore", features="pretrained", config=config)
  config.detect.threshold = "f1"
  with pytest.raises(UserError, match="'f1' needs --val DIR in the labelled layout"):
    Detector.fit([os.path.join(data, "train", "good")], method="patchcore", config=config)
