"""The embedded dataset: layouts the readers accept, exact defect masks, determinism,
idempotence and atomic regeneration."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import embedded
from data_pipelines.index import build_index

S = 64


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("emb"))
  kw = dict(image_size=S, pretrain_classes=2, eval_classes=2, images_per_class=6, seed=1)
  return out, kw, embedded.generate_embedded_dataset(out, **kw)


@pytest.mark.parametrize("kind", embedded.DEFECT_KINDS)
def test_defects_change_only_the_mask(kind):
  shares = []
  for i in range(6):
    clean, bad, mask = embedded.render("brick", i % 2, 500 + i, image_size=S, seed=0,
                                       kinds=[kind])
    changed = np.any(bad != clean, axis=-1)
    assert not changed[~mask].any()  # Exactly the clean image outside the mask.
    assert changed[mask].mean() >= 0.8  # Nearly every mask pixel differs ...
    diff = np.abs(bad.astype(int) - clean.astype(int)).max(-1)
    assert diff[mask].mean() >= 12  # ... visibly.
    shares.append(mask.mean())
  assert 0.0008 <= min(shares) and max(shares) <= 0.12


def test_layouts_and_classes(gen):
  out, kw, summary = gen
  assert summary["generated"]
  pre = build_index([("realiad", summary["pretrain_root"])])
  ev = build_index([("mvtec", summary["eval_root"])])
  assert {r.view for r in pre} == {"C1", "C2"}
  assert {r.class_name for r in pre} == set(embedded.PRETRAIN_CLASSES[:2])
  assert {r.class_name for r in ev} == set(embedded.EVAL_CLASSES[:2])
  assert not {r.class_name for r in pre} & {r.class_name for r in ev}
  for c in {r.class_name for r in pre}:
    labels = [r.label for r in pre if r.class_name == c]
    assert 0 < sum(labels) < len(labels)
  n_train, n_good, n_bad = embedded.eval_plan(kw["images_per_class"])
  for c in {r.class_name for r in ev}:
    rs = [r for r in ev if r.class_name == c]
    assert sum(r.split == "train" for r in rs) == n_train
    assert sum(r.label for r in rs) == n_bad
    assert {r.defect_type for r in rs if r.label} == set(embedded.DEFECT_KINDS)


def test_files_match_rendered_arrays(gen):
  out, kw, summary = gen
  ev = build_index([("mvtec", summary["eval_root"])])
  for c in embedded.EVAL_CLASSES[:2]:
    bad = sorted(r for r in ev if r.class_name == c and r.label)
    # Image i of the anomalous test set is render(index 20000 + i); files are per-kind.
    per_kind = {}
    for i in range(len(bad)):
      kind = embedded.eval_kind(kw["seed"], c, i)
      j = per_kind.get(kind, 0)
      per_kind[kind] = j + 1
      clean, img, mask = embedded.render(c, 0, 20000 + i, image_size=S, seed=kw["seed"],
                                         kinds=[kind])
      base = os.path.join(summary["eval_root"], c)
      file_img = np.asarray(Image.open(os.path.join(base, "test", kind, f"{j:03d}.png")))
      file_mask = np.asarray(Image.open(
          os.path.join(base, "ground_truth", kind, f"{j:03d}_mask.png")))
      np.testing.assert_array_equal(file_img, img)
      np.testing.assert_array_equal(file_mask > 0, mask)
      # PNG: the file differs from the clean image only inside its mask file.
      assert not np.any(file_img != clean, axis=-1)[file_mask == 0].any()
  # Pretraining images are JPEG 95: close to the rendered arrays, masks exact.
  pre = build_index([("realiad", summary["pretrain_root"])])
  ng = [r for r in pre if r.label][:4]
  for r in ng:
    name = r.class_name
    view = int(r.view[1:]) - 1
    index = int(r.sample_id[1:]) - 1
    kinds = [k for k in embedded.DEFECT_KINDS
             if embedded.REALIAD_CODES[k] == r.defect_type]
    _, img, mask = embedded.render(name, view, index, image_size=S, seed=kw["seed"],
                                   kinds=_kinds_of(kw["seed"], name, index))
    assert kinds[0] == _kinds_of(kw["seed"], name, index)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(r.mask_path)) > 0, mask)
    err = np.abs(np.asarray(Image.open(r.image_path)).astype(int) - img.astype(int))
    assert err.mean() < 3.0


def _kinds_of(seed, name, sample):
  # The generator's documented rule: kinds drawn per sample with this key.
  r = np.random.default_rng(embedded._key(seed, "kinds", name, sample))
  return [str(k) for k in r.choice(embedded.DEFECT_KINDS, size=1 + int(r.random() < 0.2),
                                   replace=False)]


def test_idempotent_deterministic_and_atomic(gen, tmp_path):
  out, kw, summary = gen
  marker = os.path.join(out, embedded.MARKER)
  mtime = os.path.getmtime(marker)
  again = embedded.generate_embedded_dataset(out, **kw)
  assert not again["generated"] and os.path.getmtime(marker) == mtime
  # Another directory, same settings: identical files.
  other = embedded.generate_embedded_dataset(str(tmp_path / "b"), **kw)
  for root, _, files in os.walk(summary["eval_root"]):
    for f in files:
      rel = os.path.relpath(os.path.join(root, f), summary["eval_root"])
      with open(os.path.join(root, f), "rb") as x, \
           open(os.path.join(other["eval_root"], rel), "rb") as y:
        assert x.read() == y.read()
  # An interrupted run (no marker, leftovers) is regenerated from scratch.
  os.remove(os.path.join(tmp_path / "b", embedded.MARKER))
  os.makedirs(tmp_path / "b" / ".embedded-tmp-stale")
  stray = tmp_path / "b" / "eval" / "stray.txt"
  stray.write_text("x")
  third = embedded.generate_embedded_dataset(str(tmp_path / "b"), **kw)
  assert third["generated"] and not stray.exists()
  assert not (tmp_path / "b" / ".embedded-tmp-stale").exists()
  with pytest.raises(ValueError, match="also pretraining"):
    embedded.generate_embedded_dataset(str(tmp_path / "c"), pretrain_classes=["brick"],
                                       eval_classes=["brick"])
