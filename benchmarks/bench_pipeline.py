"""Throughput of the pretraining input pipeline on RealIAD-like sources, per core, per mode.

Generates (once, into --data-dir) --source-size JPEG photographs with PNG masks in the RealIAD
layout (crops of scikit-image's bundled photographs with sensor-like noise: JPEG decoding costs
what it costs on real photographs, unlike flat synthetic images), and measures, for each mode:

  default            references decoded per example, colour augmentation on the host
  bank               the precomputed reference bank (the loader's load_references=False),
                     host augmentation
  device             references decoded, augmentation in the train step (host: none)
  bank_device        reference bank and device augmentation: the host decodes, resizes and
                     crops one image and its mask per example and makes the token labels
  bank_device_draft  as bank_device, JPEGs decoded at reduced scale (data.jpeg_draft)

Figures per mode: examples_per_core_s, the examples one core makes per second of CPU time
(examples / CPU seconds of the process, single-threaded, no decoded-image cache: a real
index is far larger than the cache); examples_per_s_<W>_workers, the wall rate through grain
with W worker processes, and examples_per_cpu_s_<W>_workers, the same examples over the CPU
time of the main process and all workers (what a core gives through grain, IPC included);
cores_per_accelerator = ceil(--step-rate / examples_per_core_s). CPU time is the measure that
holds on a shared machine: wall rates there depend on the other load. "stages" splits the
host's work per example into its parts (thread CPU time); "threads" measures read threads and
workers for bank_device; "draft_pixels" compares draft-decoded crops with full decodes.
Prints one JSON line.

  python benchmarks/bench_pipeline.py [--data-dir DIR] [--batches 6] [--workers 1]
      [--sweep-workers 0,1,2] [--threads 1,2,4] [--step-rate 780] [--feature-cosine]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

MODES = {  # name: (host augmentation, references decoded, jpeg draft)
    "default": (True, True, False),
    "bank": (True, False, False),
    "device": (False, True, False),
    "bank_device": (False, False, False),
    "bank_device_draft": (False, False, True),
}
_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
           "retina.jpg", "ihc.png", "motorcycle_left.png", "brick.png", "grass.png",
           "gravel.png")


def _photos() -> list[np.ndarray]:
  """scikit-image's bundled photographs (shipped with the package: nothing is downloaded)."""
  import skimage
  from PIL import Image
  folder = os.path.join(os.path.dirname(skimage.__file__), "data")
  out = []
  for name in _PHOTOS:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      out.append(np.asarray(Image.open(path).convert("RGB")))
  if not out:
    raise FileNotFoundError(f"no bundled photographs found in {folder}")
  return out


def generate_realiad_like(root: str, *, classes: int = 2, normal_samples: int = 6,
                          anomalous_samples: int = 3, views: int = 2, size: int = 512,
                          quality: int = 90, seed: int = 0) -> str:
  """Writes a RealIAD-layout folder (see data_pipelines/readers/realiad.py) and returns it.

  Every anomalous sample has a mask in each view (an ellipse), so a third of the images are
  anomalous, about RealIAD's share.
  """
  from PIL import Image, ImageDraw
  marker = os.path.join(root, ".complete")
  image_root = os.path.join(root, "realiad_512")
  key = f"{classes} {normal_samples} {anomalous_samples} {views} {size} {quality} {seed}"
  if os.path.isfile(marker) and open(marker).read() == key:
    return image_root
  rng = np.random.default_rng(seed)
  photos = _photos()

  def image() -> Image.Image:
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.6, 1.0))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    arr = np.asarray(crop.resize((size, size), Image.BICUBIC), np.float32)
    if rng.random() < 0.5:
      arr = arr[:, ::-1]
    arr = arr * rng.uniform(0.8, 1.2, 3) + rng.normal(0, 3.0, arr.shape)  # tint, sensor noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

  def mask() -> Image.Image:
    m = Image.new("L", (size, size), 0)
    cx, cy = rng.integers(size // 5, 4 * size // 5, 2)
    rx, ry = rng.integers(size // 40, size // 8, 2)
    ImageDraw.Draw(m).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    return m

  for c in range(classes):
    cls = f"part{c}"
    for s in range(normal_samples + anomalous_samples):
      sample = f"S{s + 1:04d}"
      anomalous = s >= normal_samples
      folder = os.path.join(image_root, cls, *(("NG", "AK", sample) if anomalous
                                               else ("OK", sample)))
      os.makedirs(folder, exist_ok=True)
      for v in range(views):
        stem = (f"{cls}_{s + 1:04d}_NG_AK_C{v + 1}_20230101" if anomalous
                else f"{cls}_{s + 1:04d}_OK_C{v + 1}_20230101")
        image().save(os.path.join(folder, stem + ".jpg"), quality=quality)
        if anomalous:
          mask().save(os.path.join(folder, stem + ".png"))
  with open(marker, "w") as f:
    f.write(key)
  return image_root


def _loader(records, mode: str, args, **kwargs):
  from data_pipelines.pretrain_pipeline import make_pretrain_loader
  host_augment, references, draft = MODES[mode]
  return make_pretrain_loader(records, image_size=args.image_size, batch_size=args.batch_size,
                              augment=host_augment, load_references=references,
                              jpeg_draft=draft, cache_size=0, seed=0, **kwargs)


def _cpu_rate(records, mode: str, args) -> float:
  """Examples per CPU second in this process (batches made directly, one thread)."""
  loader = _loader(records, mode, args)
  loader.batch_at(0)  # first-call costs (imports, allocations) are not throughput
  start = time.process_time()
  for step in range(1, args.batches + 1):
    loader.batch_at(step)
  return args.batches * args.batch_size / (time.process_time() - start)


def _cpu_seconds(proc) -> float:
  """CPU seconds of a process and all its descendants (grain's workers)."""
  import psutil
  total = 0.0
  for p in [proc] + proc.children(recursive=True):
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


_PREFETCH, _WORKER_BUFFER = 4, 2   # the loader's defaults (batches)


def _grain_rate(records, mode: str, args, workers: int, threads: int) -> tuple[float, float]:
  """(wall examples/s, examples per CPU second of all processes) through grain.

  grain works on up to `in_flight` batches at once (threads and buffers of each worker), so
  the first batches after a warm-up were mostly made before it: the timed batches are at
  least three times that many, the warm-up as many.
  """
  import psutil
  in_flight = max(1, workers) * (max(threads, _PREFETCH) + _WORKER_BUFFER)
  timed = max(args.batches, 3 * in_flight)
  loader = _loader(records, mode, args, num_workers=workers, num_threads=threads,
                   prefetch_buffer_size=_PREFETCH, worker_buffer_size=_WORKER_BUFFER)
  it = iter(loader)
  for _ in range(max(args.warmup, in_flight)):  # start-up is not throughput
    next(it)
  me = psutil.Process()
  cpu0, start = _cpu_seconds(me), time.perf_counter()
  for _ in range(timed):
    next(it)
  wall, cpu = time.perf_counter() - start, _cpu_seconds(me) - cpu0
  it.close()
  n = timed * args.batch_size
  return n / wall, n / max(cpu, 1e-9)


def _stages(records, args) -> dict:
  """Thread CPU ms per example of each part of the host's work (over every record)."""
  from adjax.labels import token_labels
  from data_pipelines import augment, images
  from PIL import Image
  patch = 14
  threshold = int(32 / 196 * patch * patch)
  sums: dict[str, float] = {}

  def timed(name, fn, *a, **kw):
    t0 = time.thread_time()
    out = fn(*a, **kw)
    sums[name] = sums.get(name, 0.0) + time.thread_time() - t0
    return out

  rng = np.random.default_rng(0)
  examples = []
  anomalous = 0
  for _ in range(args.stage_rounds):
    for r in records:
      image_bytes, mask_bytes = timed("read", images.read_record_bytes, r)
      full = timed("decode", images.decode_image, image_bytes)
      timed("resize_crop", images.resize_center_crop, full, args.image_size)
      small, hw = timed("decode_draft", images._decode_image, image_bytes, "",
                        draft_short_side=args.image_size)
      crop = timed("resize_crop_draft", images.resize_center_crop, small, args.image_size,
                   source_hw=hw)
      mask = np.zeros((args.image_size,) * 2, np.uint8)
      if mask_bytes is not None:
        anomalous += 1
        m = timed("mask", images.decode_mask, mask_bytes)
        mask = timed("mask", images.resize_center_crop, m.astype(np.uint8) * 255,
                     args.image_size, resample=Image.NEAREST)
        mask = (mask > 127).astype(np.uint8)
      angle, norm = timed("labels", token_labels, mask[None], patch, threshold)
      timed("host_augment_2_views", lambda x: [augment.color_augment(x, rng) for _ in (1, 2)],
            crop)
      examples.append({"view1": crop, "view2": crop, "masks": mask, "angle_labels": angle[0],
                       "norm_labels": norm[0], "ref_valid": np.ones(8, bool),
                       "class_id": np.int32(0), "view_id": np.int32(0), "label": np.int32(0),
                       "record": np.int64(0)})
  b = args.batch_size
  for lo in range(0, len(examples) - b + 1, b):
    batch = examples[lo:lo + b]
    timed("collate", lambda: {k: np.stack([e[k] for e in batch]) for k in batch[0]})
  n = len(examples)
  per = {k: 1e3 * v / n for k, v in sums.items()}
  per["collate"] = 1e3 * sums["collate"] / (n // b * b)
  per["anomalous_share"] = anomalous / n
  # References: n_shot from {1, 4, 8} (mean 13/3) images read, decoded and resized each.
  per["references_mean_4.33_shots"] = 13 / 3 * (per["read"] + per["decode"] + per["resize_crop"])
  per["bank_device_total"] = sum(per[k] for k in ("read", "decode", "resize_crop", "mask",
                                                  "labels", "collate"))
  per["bank_device_draft_total"] = sum(per[k] for k in ("read", "decode_draft",
                                                        "resize_crop_draft", "mask", "labels",
                                                        "collate"))
  return {k: round(v, 3) for k, v in per.items()}


def _draft_pixels(records, args) -> dict:
  """PSNR (dB) and cosine of draft-decoded crops against the full decode's."""
  from data_pipelines import images
  full, draft = [], []
  for r in records:
    data, _ = images.read_record_bytes(r)
    full.append(images.preprocess_pair(data, None, args.image_size)[0])
    draft.append(images.preprocess_pair(data, None, args.image_size, jpeg_draft=True)[0])
  full_f = np.stack(full).astype(np.float64)
  draft_f = np.stack(draft).astype(np.float64)
  mse = ((full_f - draft_f) ** 2).mean(axis=(1, 2, 3))
  psnr = 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))
  out = {"psnr_db_mean": round(float(psnr.mean()), 2), "psnr_db_min": round(float(psnr.min()), 2),
         "max_abs_diff": int(np.abs(full_f - draft_f).max())}
  if args.feature_cosine:
    out.update(_feature_cosine(full, draft))
  return out


def _feature_cosine(full: list[np.ndarray], draft: list[np.ndarray]) -> dict:
  """Per-token cosine of EfficientNet-Lite0 features (the packaged ImageNet weights)."""
  import jax.numpy as jnp
  from adjax.models.backbones import get_backbone
  from adjax.models.backbones.efficientnet import default_weights_path
  backbone = get_backbone("efficientnet-lite0")
  params = backbone.load(default_weights_path(), cache=False)
  out = {}
  for name, images in (("full", full), ("draft", draft)):
    feats = backbone.extract(params, jnp.asarray(np.stack(images), jnp.float32) / 255.0)
    out[name] = [np.asarray(f, np.float64) for f in feats]
  result = {}
  for k, (a, b) in enumerate(zip(out["full"], out["draft"])):
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    result[f"feature_cosine_l{k + 1}_mean"] = round(float(cos.mean()), 5)
    result[f"feature_cosine_l{k + 1}_min"] = round(float(cos.min()), 5)
  return result


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(),
                                                    "adjax_realiad_like_bench"))
  p.add_argument("--source-size", type=int, default=512)
  p.add_argument("--classes", type=int, default=2)
  p.add_argument("--normal-samples", type=int, default=6, help="per class (x views images)")
  p.add_argument("--anomalous-samples", type=int, default=3)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--workers", default="1", help="grain worker counts to time in every mode "
                 "(comma list; empty: none)")
  p.add_argument("--sweep-workers", default="0,1,2",
                 help="worker counts to time with each --threads for bank_device")
  p.add_argument("--threads", default="1,2,4", help="read threads to time for bank_device")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--stage-rounds", type=int, default=2, help="passes over the records for "
                 "the per-stage split")
  p.add_argument("--step-rate", type=float, default=780.0,
                 help="examples/s one accelerator's train step consumes")
  p.add_argument("--feature-cosine", action="store_true",
                 help="also compare draft and full decodes in EfficientNet-Lite0 features")
  args = p.parse_args()
  modes = [m for m in args.modes.split(",") if m]
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    p.error(f"--modes: unknown {unknown}; expected some of {list(MODES)}")
  from data_pipelines.index import build_index
  root = generate_realiad_like(args.data_dir, classes=args.classes,
                               normal_samples=args.normal_samples,
                               anomalous_samples=args.anomalous_samples, size=args.source_size)
  records = build_index([("realiad", root)])
  cores = len(os.sched_getaffinity(0))
  workers = [int(w) for w in args.workers.split(",") if w]
  result = {"benchmark": "pretrain_pipeline", "source": f"{args.source_size} px JPEG",
            "image_size": args.image_size, "batch_size": args.batch_size,
            "batches": args.batches, "records": len(records), "cores": cores,
            "step_rate": args.step_rate, "modes": {}}
  for mode in modes:
    per_core = _cpu_rate(records, mode, args)
    entry = {"examples_per_core_s": round(per_core, 1),
             "ms_per_example": round(1e3 / per_core, 2),
             "cores_per_accelerator": math.ceil(args.step_rate / per_core)}
    for w in workers:
      wall, per_cpu = _grain_rate(records, mode, args, w, threads=2)
      entry[f"examples_per_s_{w}_worker{'s' if w > 1 else ''}"] = round(wall, 1)
      entry[f"examples_per_cpu_s_{w}_worker{'s' if w > 1 else ''}"] = round(per_cpu, 1)
    result["modes"][mode] = entry
  if "default" in result["modes"]:
    base = result["modes"]["default"]["examples_per_core_s"]
    for entry in result["modes"].values():
      entry["per_core_vs_default"] = round(entry["examples_per_core_s"] / base, 2)
  threads = [int(t) for t in args.threads.split(",") if t]
  if threads:
    sweep = {}
    for w in [int(w) for w in args.sweep_workers.split(",") if w]:
      for t in threads:
        wall, per_cpu = _grain_rate(records, "bank_device", args, w, threads=t)
        sweep[f"{w}w_{t}t"] = {"examples_per_s": round(wall, 1),
                               "examples_per_cpu_s": round(per_cpu, 1)}
    result["threads"] = sweep
  result["stages_ms_per_example"] = _stages(records, args)
  result["draft_pixels"] = _draft_pixels(records, args)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
