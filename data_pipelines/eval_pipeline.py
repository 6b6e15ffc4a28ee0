"""The evaluation data of one class: normal training images (all or k-shot) and the test set.

Images are resized and centre-cropped as docs/method.md section 1 says (`images.load_record`);
masks are binarised to {0, 1}; an anomalous image without a mask (a record whose mask_path is
None) gets an all-zero mask and `test_has_mask` False, so that pixel metrics can leave it out.
Everything is loaded into memory (the evaluation sets are small), with a few threads because PIL
releases the GIL while decoding.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from data_pipelines import images as images_lib
from data_pipelines.records import Record


def _load_all(records: Sequence[Record], size: int, num_threads: int,
              resize: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  if not records:
    return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), np.uint8)
  with ThreadPoolExecutor(max(1, num_threads)) as pool:
    pairs = list(pool.map(lambda r: images_lib.load_record(r, size, resize), records))
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def eval_classes(records: Sequence[Record]) -> list[str]:
  """The class names of an evaluation index, sorted."""
  return sorted({r.class_name for r in records})


def load_eval_class(records: Sequence[Record], class_name: str, *, image_size: int,
                    k_shot: int | None = None, noisy_share: float = 0.0, seed: int = 0,
                    dataset: str | None = None, view: str | None = None,
                    num_threads: int = 4, resize: int | None = None) -> dict[str, Any]:
  """Loads one evaluation class.

  Args:
    records: the evaluation index.
    class_name: the class to load.
    image_size: S (224 in the paper).
    k_shot: None: all normal training images; k: k of them, drawn with `seed` (few-shot).
    noisy_share: the share of the training set that is anomalous (the "noisy training set"
      setting): round(noisy_share * n_train / (1 - noisy_share)) anomalous test images, drawn
      with `seed`, move from the test set into the training set. 0 disables it.
    seed: seed of the k-shot and noisy draws.
    dataset: restrict to one dataset when class names repeat across datasets.
    view: restrict to one camera view (RealIAD-style multi-view data).
    num_threads: decoding threads.
    resize: short side before the centre crop to image_size (None: image_size).

  Returns:
    dict with train_images (N, S, S, 3) uint8, test_images (M, S, S, 3) uint8, test_masks
    (M, S, S) uint8 in {0, 1}, test_labels (M,) int32, test_has_mask (M,) bool (a normal
    image or one with a mask: the images the pixel metrics are computed over), train_paths,
    test_paths,
    test_defect_types (lists of str), train_noisy (N,) bool (which training images are
    anomalous), class_name, dataset.
  """
  chosen = [r for r in records if r.class_name == class_name
            and (dataset is None or r.dataset == dataset) and (view is None or r.view == view)]
  if not chosen:
    have = sorted({(r.dataset, r.class_name) for r in records})
    raise ValueError(f"class {class_name!r} (dataset={dataset}, view={view}) is not in the "
                     f"evaluation index; it has {have}")
  datasets = sorted({r.dataset for r in chosen})
  if len(datasets) > 1:
    raise ValueError(f"class {class_name!r} is in several datasets {datasets}; pass dataset=")
  if not 0.0 <= noisy_share < 1.0:
    raise ValueError(f"noisy_share must be in [0, 1), got {noisy_share}")
  train = sorted(r for r in chosen if r.split == "train" and r.label == 0)
  test = sorted(r for r in chosen if r.split == "test")
  if not train or not test:
    raise ValueError(f"class {class_name!r} needs normal training images and test images; "
                     f"found {len(train)} and {len(test)}")
  rng = np.random.default_rng([seed, 7919])
  if k_shot is not None:
    if not 1 <= k_shot <= len(train):
      raise ValueError(f"k_shot={k_shot} must be in 1..{len(train)} (training normals of "
                       f"{class_name!r})")
    pick = np.sort(rng.choice(len(train), size=k_shot, replace=False))
    train = [train[i] for i in pick]
  noisy = []
  if noisy_share > 0:
    anomalous = [i for i, r in enumerate(test) if r.label == 1]
    n = int(round(noisy_share * len(train) / (1.0 - noisy_share)))
    if n > len(anomalous) - 1:
      raise ValueError(f"noisy_share={noisy_share} needs {n} anomalous test images of "
                       f"{class_name!r} (and one left to test); it has {len(anomalous)}")
    moved = set(rng.choice(anomalous, size=n, replace=False).tolist())
    noisy = [test[i] for i in sorted(moved)]
    test = [r for i, r in enumerate(test) if i not in moved]
  train_all = train + noisy
  train_images, _ = _load_all(train_all, image_size, num_threads, resize)
  test_images, test_masks = _load_all(test, image_size, num_threads, resize)
  return {
      "train_images": train_images,
      "test_images": test_images,
      "test_masks": test_masks,
      "test_labels": np.array([r.label for r in test], np.int32),
      "test_has_mask": np.array([r.label == 0 or r.mask_path is not None for r in test], bool),
      "train_paths": [r.image_path for r in train_all],
      "test_paths": [r.image_path for r in test],
      "test_defect_types": [r.defect_type for r in test],
      "train_noisy": np.array([r.label == 1 for r in train_all], bool),
      "class_name": class_name,
      "dataset": datasets[0],
  }
