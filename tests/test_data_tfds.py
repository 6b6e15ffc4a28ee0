"""TFDS round trip: folder -> ArrayRecord shards -> tfds data source gives the same records,
the same decoded images and the same pretraining batches (no TensorFlow involved)."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from data_pipelines import images
from data_pipelines.embedded import generate_embedded_dataset
from data_pipelines.pretrain_pipeline import make_pretrain_loader
from data_pipelines.records import build_index
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
