"""TFDS round trip: folder -> ArrayRecord shards -> tfds data source gives the same records,
the same decoded images and the same pretraining batches (no TensorFlow involved)."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from data_pipelines import images
from data_pipelines.embedded import generate_embedded_dataset
from data_pipelines.pretrain_pipeline import make_pretrain_loader
from data_pipelines.index import build_index
from data_pipelines.tfds_builders import pack_dataset, packed_records


def test_round_trip(tmp_path):
  summary = generate_embedded_dataset(str(tmp_path / "emb"), image_size=28,
                                      pretrain_classes=2, eval_classes=1, images_per_class=4,
                                      seed=5)
  for fmt, root in (("realiad", summary["pretrain_root"]), ("mvtec", summary["eval_root"])):
    folder = build_index([(fmt, root)])
    builder_dir = pack_dataset(fmt, root, str(tmp_path / "tfds"))
    packed = packed_records(builder_dir)
    assert all(r.packed is not None and r.packed[0] == builder_dir for r in packed)
    assert [dataclasses.replace(r, packed=None) for r in packed] == folder
    for p, f in zip(packed, folder):
      # The shards hold the files' bytes, read through tfds.data_source.
      assert images.read_record_bytes(p) == images.read_record_bytes(f)
      for a, b in zip(images.load_record(p, 28), images.load_record(f, 28)):
        np.testing.assert_array_equal(a, b)
    # A second call reuses the finished copy.
    assert pack_dataset(fmt, root, str(tmp_path / "tfds")) == builder_dir
  # The pretraining pipeline gives the same batches from either source.
  root = summary["pretrain_root"]
  kw = dict(image_size=28, batch_size=4, shots=(1, 2), max_shots=2, seed=0)
  a = make_pretrain_loader(build_index([("realiad", root)]), **kw).batch_at(1)
  b = make_pretrain_loader(packed_records(pack_dataset("realiad", root, str(tmp_path / "tfds"))),
                           **kw).batch_at(1)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert "tensorflow" not in sys.modules


def test_a_pack_is_reused_only_for_the_same_settings_and_reports_what_it_skipped(tmp_path,
                                                                                caplog):
  import logging
  import pytest
  from data_pipelines.tfds_builders import pack_summary
  summary = generate_embedded_dataset(str(tmp_path / "emb"), image_size=28,
                                      pretrain_classes=2, eval_classes=1, images_per_class=4,
                                      seed=5)
  root = summary["pretrain_root"]
  classes = sorted({r.class_name for r in build_index([("realiad", root)])})
  out = str(tmp_path / "tfds")
  builder_dir = pack_dataset("realiad", root, out, classes=classes[:1])
  assert pack_summary(builder_dir)["classes"] == classes[:1]
  # The builder folder depends only on the format: asking for every class must not get the
  # one-class pack back.
  with pytest.raises(ValueError, match=r"other settings: classes \(\['" + classes[0]):
    pack_dataset("realiad", root, out)
  assert pack_dataset("realiad", root, out, classes=classes[:1]) == builder_dir

  # Training on a class the pack lacks is an error, as with the folder.
  from adjax.configs import default_config
  from adjax.errors import UserError
  from adjax.pretrain import pretrain_records
  config = default_config()
  config.data.pretrain_tfds_dir = builder_dir
  config.data.pretrain_classes = ",".join(classes)
  with pytest.raises(UserError, match=rf"names \['{classes[1]}'\], which .* does not hold"):
    pretrain_records(config)
  config.data.pretrain_classes = classes[0]
  assert {r.class_name for r in pretrain_records(config)} == {classes[0]}
  # Packs of several datasets merge into one index, as folders do.
  mvtec_pack = pack_dataset("mvtec", summary["eval_root"], str(tmp_path / "tfds_mvtec"))
  config.data.pretrain_tfds_dir = f"{builder_dir},{mvtec_pack}"
  config.data.pretrain_classes = ""
  merged = pretrain_records(config)
  assert {r.class_key for r in merged} == (
      {f"realiad/{classes[0]}"} | {r.class_key for r in packed_records(mvtec_pack)})
  assert len(merged) == len(packed_records(builder_dir)) + len(packed_records(mvtec_pack))
  config.data.pretrain_tfds_dir = builder_dir

  # A corrupt image with --skip-bad: packed without it, said, and recorded.
  folder = build_index([("realiad", root)])
  with open(folder[0].image_path, "wb") as f:
    f.write(b"not an image")
  with caplog.at_level(logging.WARNING, logger="adjax.data"):
    skipping = pack_dataset("realiad", root, str(tmp_path / "tfds2"), skip_bad=True,
                            max_skip_share=0.2)
  done = pack_summary(skipping)
  assert done["records"] == len(folder) - 1
  assert [s["file"] for s in done["skipped"]] == [folder[0].image_path]
  assert "skipped 1 unreadable" in caplog.text
  assert len(packed_records(skipping)) == len(folder) - 1


def test_an_empty_mask_fails_from_the_pack_as_from_the_folder(tmp_path):
  import pytest
  summary = generate_embedded_dataset(str(tmp_path / "emb"), image_size=28,
                                      pretrain_classes=1, eval_classes=1, images_per_class=4,
                                      seed=5)
  root = summary["pretrain_root"]
  anomalous = [r for r in build_index([("realiad", root)]) if r.mask_path][0]
  open(anomalous.mask_path, "wb").close()
  with pytest.raises(images.ImageDecodeError):
    images.load_record(anomalous, 28)
  packed = {r.image_path: r for r in packed_records(
      pack_dataset("realiad", root, str(tmp_path / "tfds"), verify=False))}
  with pytest.raises(images.ImageDecodeError):
    images.load_record(packed[anomalous.image_path], 28)
