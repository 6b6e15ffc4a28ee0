"""Pretraining and evaluation pipelines on a tiny embedded dataset: shapes, labels, the anomaly
guarantee, references, determinism, sharding and exact restore of the iterator state."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines import images
from data_pipelines.embedded import generate_embedded_dataset
from data_pipelines.eval_pipeline import load_eval_class
from data_pipelines.pretrain_pipeline import make_pretrain_loader
from data_pipelines.index import build_index

S, P = 56, 14


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = tmp_path_factory.mktemp("emb")
  summary = generate_embedded_dataset(str(out), image_size=S, pretrain_classes=3,
                                      eval_classes=1, images_per_class=6, seed=3)
  pre = build_index([("realiad", summary["pretrain_root"])])
  ev = build_index([("mvtec", summary["eval_root"])])
  decoded = [images.load_record(r, S) for r in pre]
  return pre, ev, decoded


def _find(image, decoded):
  hits = [i for i, (im, _) in enumerate(decoded) if np.array_equal(im, image)]
  assert len(hits) == 1
  return hits[0]


def _brute_labels(mask, p, thr):
  g = mask.shape[0] // p
  angle = np.zeros((g, g), np.float32)
  norm = np.zeros((g, g), np.float32)
  for i in range(g):
    for j in range(g):
      angle[i, j] = float(np.count_nonzero(mask[i * p:(i + 1) * p, j * p:(j + 1) * p]) > thr)
      norm[i, j] = float(mask[i * p, j * p] != 0)
  return angle, norm


def test_shapes_labels_and_references(data):
  pre, _, decoded = data
  loader = make_pretrain_loader(pre, image_size=S, batch_size=6, shots=(1, 3), max_shots=3,
                                augment=False, patch_size=P, label_threshold=20, seed=1)
  assert len(loader) == len(pre) // 6 == loader.steps_per_epoch
  it = iter(loader)
  for _ in range(3):
    b = next(it)
    shapes = {k: (v.shape, v.dtype.name) for k, v in b.items()}
    assert shapes == {
        "view1": ((6, S, S, 3), "uint8"), "view2": ((6, S, S, 3), "uint8"),
        "masks": ((6, S, S), "uint8"), "angle_labels": ((6, 4, 4), "float32"),
        "norm_labels": ((6, 4, 4), "float32"), "refs": ((6, 3, S, S, 3), "uint8"),
        "ref_valid": ((6, 3), "bool"), "class_id": ((6,), "int32"),
        "view_id": ((6,), "int32"), "label": ((6,), "int32"), "record": ((6,), "int64")}
    n_shot = int(b["ref_valid"][0].sum())
    assert n_shot in (1, 3)
    assert (b["ref_valid"] == (np.arange(3) < n_shot)).all()
    for k in range(6):
      # Identify the record by its pixels (augment=False), not through the pipeline's plan.
      idx = _find(b["view1"][k], decoded)
      rec = pre[idx]
      np.testing.assert_array_equal(b["view2"][k], b["view1"][k])
      np.testing.assert_array_equal(b["masks"][k], decoded[idx][1])
      assert b["label"][k] == rec.label and (b["masks"][k].any() == bool(rec.label))
      assert loader.plan.records[b["record"][k]] == rec   # the index of the plan's record
      assert loader.class_names[b["class_id"][k]] == f"{rec.dataset}/{rec.class_name}"
      assert loader.view_names[b["view_id"][k]] == rec.view
      angle, norm = _brute_labels(b["masks"][k], P, 20)
      np.testing.assert_array_equal(b["angle_labels"][k], angle)
      np.testing.assert_array_equal(b["norm_labels"][k], norm)
      for j in range(3):
        if j >= n_shot:
          assert not b["refs"][k, j].any()
          continue
        ref = pre[_find(b["refs"][k, j], decoded)]
        assert ref.label == 0 and ref != rec
        assert (ref.class_name, ref.view) == (rec.class_name, rec.view)


def test_anomaly_guarantee_and_share(data):
  pre, _, _ = data
  # Only two anomalous images in the whole index: every batch still gets one.
  anomalous = [r for r in pre if r.label][:2]
  few = sorted([r for r in pre if not r.label] + anomalous)
  loader = make_pretrain_loader(few, image_size=S, batch_size=5, shots=(1,), max_shots=1,
                                patch_size=P, seed=0)
  counts = [sum(few[loader.plan.record_index(t, s)].label for s in range(5))
            for t in range(40)]
  assert counts == [1] * 40
  b = next(iter(loader))
  assert b["label"].sum() == 1 and b["masks"].reshape(5, -1).any(1).sum() == 1
  # A fixed share: round(0.5 * 8) = 4 anomalous images in every batch.
  loader = make_pretrain_loader(pre, image_size=S, batch_size=8, anomaly_share=0.5,
                                shots=(1,), max_shots=1, patch_size=P, seed=0)
  drawn = [[loader.plan.record_index(t, s) for s in range(8)] for t in range(12)]
  assert all(sum(pre[i].label for i in row) == 4 for row in drawn)
  # Each stream is a permutation per pass: the batches within the first pass over the
  # anomalous pool A draw distinct images of A.
  a_pool = {i for i, r in enumerate(pre) if r.label}
  full = len(a_pool) // 4
  first = [i for row in drawn[:full] for i in row if pre[i].label]
  assert len(first) == 4 * full == len(set(first)) and set(first) <= a_pool


def test_sharding(data):
  pre, _, _ = data
  kw = dict(image_size=S, batch_size=4, shots=(1, 2, 3), max_shots=3, patch_size=P, seed=2)
  l0 = make_pretrain_loader(pre, shard_index=0, shard_count=2, **kw)
  l1 = make_pretrain_loader(pre, shard_index=1, shard_count=2, **kw)
  assert len(l0) == len(l1) == (len(pre) // 2) // 4
  s0 = {l0.plan.record_index(t, s) for t in range(len(l0)) for s in range(4)}
  s1 = {l1.plan.record_index(t, s) for t in range(len(l1)) for s in range(4)}
  assert s0 <= set(range(0, len(pre), 2)) and s1 <= set(range(1, len(pre), 2))
  assert [l0.plan.n_shot(t) for t in range(20)] == [l1.plan.n_shot(t) for t in range(20)]
  assert len({l0.plan.n_shot(t) for t in range(20)}) > 1


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_determinism_and_exact_restore(data):
  pre, _, _ = data
  kw = dict(image_size=S, batch_size=4, shots=(1, 2), max_shots=2, patch_size=P)
  first = _take(iter(make_pretrain_loader(pre, seed=7, **kw)), 5)
  again = _take(iter(make_pretrain_loader(pre, seed=7, **kw)), 5)
  other = _take(iter(make_pretrain_loader(pre, seed=8, **kw)), 5)
  assert all(_equal(a, b) for a, b in zip(first, again))
  assert not all(_equal(a, b) for a, b in zip(first, other))
  # Augmented views differ from each other but share the mask.
  assert not np.array_equal(first[0]["view1"], first[0]["view2"])
  loader = make_pretrain_loader(pre, seed=7, **kw)
  it = iter(loader)
  _take(it, 2)
  state = it.get_state()
  rest = _take(it, 3)
  it2 = iter(loader)
  it2.set_state(state)
  assert all(_equal(a, b) for a, b in zip(rest, _take(it2, 3)))
  assert all(_equal(a, b) for a, b in zip(first[2:], rest))
  # The direct batch_at agrees with the iterator.
  assert _equal(loader.batch_at(3), first[3])


def test_worker_processes_match_in_process(data):
  pre, _, _ = data
  kw = dict(image_size=S, batch_size=4, shots=(1, 2), max_shots=2, patch_size=P, seed=4)
  want = _take(iter(make_pretrain_loader(pre, **kw)), 5)
  loader = make_pretrain_loader(pre, num_workers=2, **kw)
  it = iter(loader)
  got = _take(it, 2)
  state = it.get_state()
  got += _take(it, 3)
  assert all(_equal(a, b) for a, b in zip(want, got))
  it.close()
  it2 = iter(loader)
  it2.set_state(state)
  assert all(_equal(a, b) for a, b in zip(want[2:], _take(it2, 3)))
  it2.close()


def _same(got, want):
  return len(got) == len(want) and all(_equal(a, b) for a, b in zip(got, want))


def test_a_resumed_loader_continues_under_any_worker_count(data):
  """A checkpoint's data state resumes under another worker count (a run moved to another
  machine): the loader then starts at the saved step, with the same batches; resumed again
  with the same count, it continues from grain's state, counted from where it started."""
  pre, _, _ = data
  kw = dict(image_size=S, batch_size=4, shots=(1, 2), max_shots=2, patch_size=P, seed=4)
  in_process = make_pretrain_loader(pre, **kw)
  workers = make_pretrain_loader(pre, num_workers=2, **kw)
  want = _take(iter(in_process), 8)
  first = iter(in_process)
  assert _same(_take(first, 2), want[:2])
  saved = in_process.state(first)                     # after step 2, no workers
  second = workers.resume(saved, 2)                   # another count: starts at step 2
  assert second.start_step == 2 and _same(_take(second, 2), want[2:4])
  saved = workers.state(second)                       # after step 4, 2 workers
  second.close()
  third = workers.resume(saved, 4)                    # the same count: grain's own state
  assert third.start_step == 2 and _same(_take(third, 2), want[4:6])
  third.close()
  # Back to no workers, and a state from before the count was recorded (grain's alone).
  assert _same(_take(in_process.resume(saved, 4), 2), want[4:6])
  assert _same(_take(in_process.resume(saved["grain"], 6), 2), want[6:8])


def test_bad_settings(data):
  pre, _, _ = data
  with pytest.raises(ValueError, match="multiple of patch_size"):
    make_pretrain_loader(pre, image_size=50, batch_size=4, patch_size=P)
  with pytest.raises(ValueError, match="shots"):
    make_pretrain_loader(pre, image_size=S, batch_size=4, shots=(16,), max_shots=8)
  with pytest.raises(ValueError, match="no anomalous records"):
    make_pretrain_loader([r for r in pre if not r.label], image_size=S, batch_size=4)


def test_eval_class(data):
  _, ev, _ = data
  name = ev[0].class_name
  out = load_eval_class(ev, name, image_size=S)
  train = [r for r in ev if r.split == "train"]
  test = [r for r in ev if r.split == "test"]
  assert out["train_images"].shape == (len(train), S, S, 3)
  assert out["test_images"].shape == (len(test), S, S, 3)
  assert out["test_masks"].shape == (len(test), S, S)
  np.testing.assert_array_equal(out["test_labels"], [r.label for r in test])
  np.testing.assert_array_equal(out["test_masks"].reshape(len(test), -1).any(1),
                                [bool(r.label) for r in test])
  for k, r in enumerate(test):
    im, mk = images.load_record(r, S)
    np.testing.assert_array_equal(out["test_images"][k], im)
    np.testing.assert_array_equal(out["test_masks"][k], mk)
  few = load_eval_class(ev, name, image_size=S, k_shot=2, seed=1)
  assert few["train_images"].shape[0] == 2
  assert set(few["train_paths"]) <= {r.image_path for r in train}
  assert few["train_paths"] == load_eval_class(ev, name, image_size=S, k_shot=2,
                                               seed=1)["train_paths"]
  noisy = load_eval_class(ev, name, image_size=S, noisy_share=0.25, seed=0)
  n = round(0.25 * len(train) / 0.75)
  assert noisy["train_noisy"].sum() == n and len(noisy["test_paths"]) == len(test) - n
  assert not set(noisy["test_paths"]) & set(noisy["train_paths"])
  with pytest.raises(ValueError, match="'nope' .*not in the evaluation index"):
    load_eval_class(ev, "nope", image_size=S)
