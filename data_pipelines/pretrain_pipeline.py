"""The pretraining input pipeline (docs/method.md section 5) on grain.

Every batch is a pure function of (seed, shard, step): the pipeline is a grain `MapDataset`
over example indices j = step * batch_size + slot, mapped by `PretrainExample` and batched.
Hence the same seed gives the same batches, with or without worker processes, and the
iterator's state is just a position: `get_state()` / `set_state()` (grain's DatasetIterator
protocol, which orbax's grain checkpoint handler stores) restore it exactly.

What a step holds:
- Each process (host) reads its own shard of the records: records[shard_index::shard_count].
- Exactly `n_anomalous = max(1, round(anomaly_share * batch_size))` anomalous images per batch
  (anomaly_share None: the index's own share), placed at random slots. Anomalous and normal
  images come from two seeded streams over the shard, each reshuffled every time it wraps, so a
  batch never lacks an anomaly and each stream shows all its images before repeating one. An
  epoch is a number of batches (below): when the per-batch split of anomalous and normal
  images does not match the shard's own share, one stream wraps within an epoch while the
  other has not finished, so an epoch need not show every image exactly once.
- One n_shot per step, drawn from `shots` (the same on every host, since it depends only on
  seed and step); each image gets n_shot distinct random normal images of its own (dataset,
  class, view), the image itself excluded, drawn from the whole index (not only the shard, so
  that references do not depend on the number of hosts). refs holds `max_shots` slots; the first
  n_shot are filled and flagged in ref_valid, the rest are zeros. When a (class, view) has fewer
  than n_shot other normals, the references are drawn with replacement.
- Two views of each image: the same geometry (resize + centre crop), independent colour
  augmentation (augment.color_augment). References are not augmented. With augment=False the
  views are the plain image, which the train step can augment on the device
  (data_pipelines/device_augment.py, StepSettings.device_augment).
- Token labels of the mask for both losses (adjax.labels.token_labels).

An epoch is `steps_per_epoch = (len(records) // shard_count) // batch_size` steps, the same on
every host.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Sequence

import grain
import numpy as np

from adjax.labels import token_labels
from data_pipelines import augment as augment_lib
from data_pipelines import images as images_lib
from data_pipelines.records import Record

# Tags that keep the random streams of different purposes independent.
_TAG_SLOTS, _TAG_SHOTS, _TAG_ANOM, _TAG_NORM, _TAG_REFS, _TAG_AUG = range(6)
_INFINITE_STEPS = 2**31


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng([int(k) for k in key])


class PretrainPlan:
  """Which records, references and shot count make up each step (pure, picklable)."""

  def __init__(self, records: Sequence[Record], *, batch_size: int, shots: Sequence[int],
               max_shots: int, anomaly_share: float | None, seed: int, shard_index: int,
               shard_count: int):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not shots or any(int(s) < 1 or int(s) > max_shots for s in shots):
      raise ValueError(f"shots must be non-empty values in 1..max_shots={max_shots}, got "
                       f"{tuple(shots)}")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if anomaly_share is not None and not 0.0 < anomaly_share <= 1.0:
      raise ValueError(f"anomaly_share must be in (0, 1] or None, got {anomaly_share}")
    self.records = list(records)
    if not self.records:
      raise ValueError("no records to pretrain on")
    # The token labels of both losses come from the masks: an anomalous image without one
    # (the `folder` layout, eval.masks_optional) would be learnt as normal.
    unmasked = [r.image_path for r in self.records if r.label == 1 and r.mask_path is None]
    if unmasked:
      raise ValueError(f"{len(unmasked)} anomalous pretraining images have no mask (e.g. "
                       f"{unmasked[0]!r}); pretraining labels tokens by their masks: give "
                       "masks for them or leave them out")
    self.batch_size = batch_size
    self.shots = tuple(int(s) for s in shots)
    self.max_shots = max_shots
    self.seed, self.shard_index, self.shard_count = seed, shard_index, shard_count

    shard = np.arange(len(self.records))[shard_index::shard_count]
    labels = np.array([self.records[i].label for i in shard], np.int64)
    self.anomalous = shard[labels == 1]
    self.normal = shard[labels == 0]
    share = anomaly_share
    if share is None:
      share = sum(r.label for r in self.records) / len(self.records)
    self.n_anomalous = min(batch_size, max(1, int(round(share * batch_size))))
    if len(self.anomalous) == 0:
      raise ValueError(f"shard {shard_index}/{shard_count} has no anomalous records; a batch "
                       "needs at least one")
    if self.n_anomalous < batch_size and len(self.normal) == 0:
      raise ValueError(f"shard {shard_index}/{shard_count} has no normal records but "
                       f"anomaly_share={anomaly_share} asks for normal images in every batch")
    self.steps_per_epoch = (len(self.records) // shard_count) // batch_size
    if self.steps_per_epoch < 1:
      raise ValueError(f"{len(self.records)} records over {shard_count} shards do not fill one "
                       f"batch of {batch_size}")

    self.class_names = sorted({r.class_key for r in self.records})
    self.view_names = sorted({r.view for r in self.records})
    self._class_id = {c: i for i, c in enumerate(self.class_names)}
    self._view_id = {v: i for i, v in enumerate(self.view_names)}
    pools: dict[tuple[str, str, str], list[int]] = collections.defaultdict(list)
    for i, r in enumerate(self.records):
      if r.label == 0:
        pools[(r.dataset, r.class_name, r.view)].append(i)
    self.ref_pools = {k: np.array(v, np.int64) for k, v in pools.items()}
    lacking = sorted({(r.dataset, r.class_name, r.view) for r in self.records}
                     - set(self.ref_pools))
    if lacking:
      raise ValueError(f"no normal images to draw references from for (dataset, class, view) "
                       f"{lacking[:5]}")
    self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_perm_cache"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _draw(self, pool: np.ndarray, tag: int, k: int) -> int:
    """The k-th element of an endless stream over `pool`, reshuffled at every wrap."""
    rnd, pos = divmod(k, len(pool))
    key = (tag, rnd)
    with self._lock:
      perm = self._perm_cache.get(key)
    if perm is None:
      perm = _rng(self.seed, tag, self.shard_index, rnd).permutation(len(pool))
      with self._lock:
        if len(self._perm_cache) > 8:
          self._perm_cache.clear()
        self._perm_cache[key] = perm
    return int(pool[perm[pos]])

  def n_shot(self, step: int) -> int:
    """The shot count of a step (independent of the shard: equal on every host)."""
    return self.shots[_rng(self.seed, _TAG_SHOTS, step).integers(len(self.shots))]

  def record_index(self, step: int, slot: int) -> int:
    """Index (into records) of the image at `slot` of batch `step`."""
    order = _rng(self.seed, _TAG_SLOTS, self.shard_index, step).permutation(self.batch_size)
    rank = int(order[slot])
    if rank < self.n_anomalous:
      return self._draw(self.anomalous, _TAG_ANOM, step * self.n_anomalous + rank)
    n_normal = self.batch_size - self.n_anomalous
    return self._draw(self.normal, _TAG_NORM, step * n_normal + rank - self.n_anomalous)

  def references(self, example: int, record_index: int, n_shot: int) -> np.ndarray:
    """n_shot normal record indices of the same (dataset, class, view), itself excluded."""
    r = self.records[record_index]
    pool = self.ref_pools[(r.dataset, r.class_name, r.view)]
    others = pool[pool != record_index]
    if len(others) == 0:  # The image is the only normal of its (class, view).
      others = pool
    rng = _rng(self.seed, _TAG_REFS, self.shard_index, example)
    return rng.choice(others, size=n_shot, replace=len(others) < n_shot)

  def class_id(self, record_index: int) -> int:
    return self._class_id[self.records[record_index].class_key]

  def view_id(self, record_index: int) -> int:
    return self._view_id[self.records[record_index].view]


class PretrainExample:
  """Maps an example index to one training example (a dict of numpy arrays)."""

  def __init__(self, plan: PretrainPlan, *, image_size: int, augment: bool, patch_size: int,
               label_threshold: int, cache_size: int = 256, load_references: bool = True,
               jpeg_draft: bool = False):
    if image_size % patch_size:
      raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    self.plan = plan
    self.image_size = image_size
    self.augment = augment
    self.patch_size = patch_size
    self.label_threshold = label_threshold
    self.cache_size = cache_size
    # False when the trainer uses precomputed reference features: refs stay zeros (one slot,
    # to keep batches small) and only ref_valid says how many shots the step uses.
    self.load_references = load_references
    self.jpeg_draft = jpeg_draft  # images.preprocess_pair: reduced-scale JPEG decoding
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"], state["_lock"] = collections.OrderedDict(), None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded + resized image and mask; references repeat often, so they are cached."""
    with self._lock:
      hit = self._cache.get(index)
      if hit is not None:
        self._cache.move_to_end(index)
        return hit
    out = images_lib.load_record(self.plan.records[index], self.image_size,
                                 jpeg_draft=self.jpeg_draft)
    if self.cache_size:
      with self._lock:
        self._cache[index] = out
        while len(self._cache) > self.cache_size:
          self._cache.popitem(last=False)
    return out

  def __call__(self, example: int) -> dict[str, Any]:
    plan = self.plan
    step, slot = divmod(int(example), plan.batch_size)
    index = plan.record_index(step, slot)
    image, mask = self._load(index)
    if self.augment:
      rng = _rng(plan.seed, _TAG_AUG, plan.shard_index, example)
      view1 = augment_lib.color_augment(image, rng)
      view2 = augment_lib.color_augment(image, rng)
    else:
      view1 = view2 = image
    angle, norm = token_labels(mask[None], self.patch_size, self.label_threshold)
    n_shot = plan.n_shot(step)
    s = self.image_size
    if self.load_references:
      refs = np.zeros((plan.max_shots, s, s, 3), np.uint8)
      for k, ref in enumerate(plan.references(example, index, n_shot)):
        refs[k] = self._load(int(ref))[0]
    else:
      refs = np.zeros((1, 1, 1, 3), np.uint8)
    ref_valid = np.arange(plan.max_shots) < n_shot
    return {
        "view1": view1, "view2": view2, "masks": mask,
        "angle_labels": angle[0], "norm_labels": norm[0],
        "refs": refs, "ref_valid": ref_valid,
        "class_id": np.int32(plan.class_id(index)), "view_id": np.int32(plan.view_id(index)),
        "label": np.int32(plan.records[index].label), "record": np.int64(index),
    }


class PretrainLoader:
  """An iterable of pretraining batches; `iter()` gives a checkpointable grain iterator.

  Attributes:
    steps_per_epoch: batches in one epoch (equal on every host); also `len(loader)`.
    num_steps: batches the iterator yields in all (num_epochs * steps_per_epoch, or a very
      large number when num_epochs is None).
    class_names, view_names: what class_id / view_id index (class names as "dataset/class").
    plan: the PretrainPlan (record choice per step), for inspection.
  """

  def __init__(self, records: Sequence[Record], *, image_size: int, batch_size: int,
               shots: Sequence[int] = (1, 4, 8), max_shots: int = 8,
               anomaly_share: float | None = None, augment: bool = True, patch_size: int = 14,
               label_threshold: int = 32, seed: int = 0, shard_index: int = 0,
               shard_count: int = 1, num_workers: int = 0, num_epochs: int | None = None,
               num_threads: int = 2, prefetch_buffer_size: int = 4,
               worker_buffer_size: int = 2, cache_size: int = 256,
               load_references: bool = True, jpeg_draft: bool = False):
    self.plan = PretrainPlan(records, batch_size=batch_size, shots=shots,
                             max_shots=max_shots, anomaly_share=anomaly_share, seed=seed,
                             shard_index=shard_index, shard_count=shard_count)
    self.example_fn = PretrainExample(self.plan, image_size=image_size, augment=augment,
                                      patch_size=patch_size, label_threshold=label_threshold,
                                      cache_size=cache_size, load_references=load_references,
                                      jpeg_draft=jpeg_draft)
    self.batch_size = batch_size
    self.steps_per_epoch = self.plan.steps_per_epoch
    self.num_steps = (_INFINITE_STEPS if num_epochs is None
                      else int(num_epochs) * self.steps_per_epoch)
    self.num_workers = num_workers
    self.num_threads = num_threads
    self.prefetch_buffer_size = prefetch_buffer_size
    self.worker_buffer_size = worker_buffer_size
    self.class_names = self.plan.class_names
    self.view_names = self.plan.view_names

  def __len__(self) -> int:
    return self.steps_per_epoch

  def dataset(self, start_step: int = 0) -> grain.IterDataset:
    """The grain pipeline (batches of examples from step `start_step` on), with worker
    processes if asked."""
    ds = (grain.MapDataset.range(start_step * self.batch_size,
                                 self.num_steps * self.batch_size)
          .map(self.example_fn)
          .batch(self.batch_size, drop_remainder=True))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=max(1, self.num_threads),
        prefetch_buffer_size=self.prefetch_buffer_size))
    if self.num_workers > 0:
      # grain's worker processes read absl flags; a program that did not start through
      # absl.app has not parsed them, so take their defaults.
      from absl import flags
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=self.worker_buffer_size))
    return it_ds

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The batch of a given step, computed directly (for tests and debugging)."""
    examples = [self.example_fn(step * self.batch_size + b) for b in range(self.batch_size)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  def __iter__(self) -> "LoaderIterator":
    return LoaderIterator(self, 0)

  def state(self, iterator: "LoaderIterator") -> dict:
    """What a checkpoint keeps of `iterator`: grain's state, the step its pipeline starts at
    (grain counts from there) and the worker count the state has the shape of."""
    return {"grain": iterator.get_state(), "start_step": iterator.start_step,
            "num_workers": self.num_workers}

  def resume(self, saved: Any, step: int) -> "LoaderIterator":
    """An iterator that continues one saved by `state` after `step` batches.

    grain's state fits only the worker count it was saved with. With another count (a run
    resumed on another machine), or a state saved before the count was recorded, the
    iterator starts at `step` instead: every batch is a function of its step alone (each
    example seeds its own draws from its index), so the batches are the same ones.
    """
    if isinstance(saved, dict) and "grain" in saved and \
        saved.get("num_workers") == self.num_workers:
      iterator = LoaderIterator(self, int(saved.get("start_step", 0)))
      iterator.set_state(saved["grain"])
      return iterator
    return LoaderIterator(self, int(step))


class LoaderIterator:
  """A checkpointable iterator over a PretrainLoader's batches from step `start_step` on: a
  grain iterator that also knows where its pipeline starts, since grain's state counts from
  there (a state alone, restored on a pipeline that starts elsewhere, would replay batches)."""

  def __init__(self, loader: PretrainLoader, start_step: int):
    self.start_step = start_step
    self._iterator = iter(loader.dataset(start_step=start_step))

  def __iter__(self) -> "LoaderIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(state)

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def make_pretrain_loader(records: Sequence[Record], *, image_size: int, batch_size: int,
                         shots: Sequence[int] = (1, 4, 8), max_shots: int = 8,
                         anomaly_share: float | None = None, augment: bool = True,
                         patch_size: int = 14, label_threshold: int = 32, seed: int = 0,
                         shard_index: int = 0, shard_count: int = 1, num_workers: int = 0,
                         **kwargs) -> PretrainLoader:
  """The pretraining loader.

  Args:
    records: the pretraining index (folder or packed records; the same on every host).
    image_size: S; must be a multiple of patch_size.
    batch_size: images per batch on this host.
    shots: the set n_shot is drawn from, once per step.
    max_shots: static number of reference slots.
    anomaly_share: share of anomalous images per batch (at least one); None: the index's.
    augment: colour-augment the two views (False: both views are the plain image).
    patch_size, label_threshold: token label settings (docs/method.md section 4).
    seed: the seed of every random choice.
    shard_index, shard_count: this host's shard (jax.process_index(), jax.process_count()).
    num_workers: 0 runs in this process (with `num_threads` prefetch threads); > 0 uses grain
      worker processes.
    **kwargs: num_epochs (None: endless), num_threads, prefetch_buffer_size,
      worker_buffer_size, cache_size (decoded images kept per process), load_references
      (False: no reference images are decoded, for precomputed reference features),
      jpeg_draft (decode JPEGs at a reduced scale; see images.preprocess_pair).

  Returns:
    a PretrainLoader; `next(iter(loader))` is a dict with view1, view2 (B, S, S, 3) uint8,
    masks (B, S, S) uint8 in {0, 1}, angle_labels, norm_labels (B, S/p, S/p) float32, refs
    (B, max_shots, S, S, 3) uint8, ref_valid (B, max_shots) bool, class_id, view_id, label (B,)
    int32.
  """
  return PretrainLoader(records, image_size=image_size, batch_size=batch_size, shots=shots,
                        max_shots=max_shots, anomaly_share=anomaly_share, augment=augment,
                        patch_size=patch_size, label_threshold=label_threshold, seed=seed,
                        shard_index=shard_index, shard_count=shard_count,
                        num_workers=num_workers, **kwargs)
