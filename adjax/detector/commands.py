"""`adjax fit` and `adjax predict`: their flags and what they do (the CLI dispatches here)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

import numpy as np

from adjax.detector.format import KINDS
from adjax.errors import UserError
from adjax.io import files

log = logging.getLogger("adjax.detector")


def add_fit_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--method", required=True,
                 help="featurenorm | patchcore | padim | cflow | uniad | glass")
  p.add_argument("--train", required=True, action="append", metavar="DIR",
                 help="normal images (files or folders, searched recursively); repeatable")
  p.add_argument("--out", required=True, metavar="DETECTOR", help="detector folder to write")
  p.add_argument("--features", choices=KINDS, default=None,
                 help="feature kind (default: pretrained with --workdir, else original)")
  p.add_argument("--workdir", metavar="RUN", help="a pretraining run: its projector and config")
  p.add_argument("--val", metavar="DIR", help="validation images for the thresholds: normal "
                 "images, or a labelled folder (good/ beside defect folders); default: "
                 "config.detect.holdout_share of --train")
  p.add_argument("--export-program", action="store_true",
                 help="also write the whole scoring function as a jax.export program "
                 "(DETECTOR/program/, runs without adjax)")
  p.add_argument("--program-batch", type=int, default=8,
                 help="images per call of the exported program")


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
  p.add_argument("--detector", required=True, metavar="DETECTOR", help="from `adjax fit`")
  p.add_argument("--out", required=True, metavar="DIR", help="results folder")
  p.add_argument("--weights", metavar="FILE", help="the detector's backbone weights under "
                 "another path (their SHA-256 must match the detector's)")
  p.add_argument("--batch", type=int, default=32, help="images scored per batch")
  p.add_argument("--no-maps", action="store_true", help="skip the heat maps and masks")


def run_fit(args: argparse.Namespace, config: Any) -> dict:
  from adjax.detector.model import Detector
  features = args.features or ("pretrained" if args.workdir else "original")
  t0 = time.perf_counter()
  detector = Detector.fit(args.train, method=args.method, features=features,
                          workdir=args.workdir, val=args.val, config=config, progress=True)
  fit_seconds = time.perf_counter() - t0
  if args.export_program:
    from adjax.detector.program import export_program
    detector.program = export_program(detector, batch=args.program_batch)
  path = detector.save(args.out)
  m = detector.manifest
  return {"detector": path, "method": m["method"], "features": m["features"],
          "fit_images": m["train"]["fit_images"],
          "validation_images": m["validation"]["images"], "thresholds": m["thresholds"],
          "seconds": round(fit_seconds, 2)}


def run_predict(args: argparse.Namespace) -> dict:
  from tqdm import tqdm
  from adjax.detector import outputs
  from adjax.detector.model import Detector
  from data_pipelines.image_files import list_images, load_images, read_original
  if args.batch < 1:
    raise UserError(f"--batch must be at least 1, got {args.batch}")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise UserError(f"--out {args.out} is a file, not a folder")
  detector = Detector.load(args.detector, weights=args.weights)
  paths = list_images(args.inputs, what="input")
  os.makedirs(args.out, exist_ok=True)
  names = outputs.map_names(paths, args.inputs)
  size, resize = detector.image_size, detector.manifest.get("resize")
  pixel_stats = detector.manifest["validation"]["pixel_scores"]
  vmin, vmax = pixel_stats["min"], max(detector.pixel_threshold * 1.5, pixel_stats["max"])
  rows, failed = [], {}
  t0 = time.perf_counter()
  bar = tqdm(total=len(paths), desc="predict", unit="image", dynamic_ncols=True)
  for start in range(0, len(paths), args.batch):
    loaded = load_images(paths[start:start + args.batch], size, resize=resize)
    for path, reason in loaded.failed.items():
      log.warning("skipped %s: %s", path, reason)
    failed.update(loaded.failed)
    if loaded.paths:
      scores, maps, flags = detector.predict(loaded.images, batch=args.batch)
      norm = detector.normalised(scores)
      for i, path in enumerate(loaded.paths):
        rows.append((path, scores[i], norm[i], flags[i]))
        if not args.no_maps:
          outputs.write_maps(args.out, names[path], read_original(path), maps[i],
                             image_size=size, resize=resize,
                             pixel_threshold=detector.pixel_threshold, vmin=vmin, vmax=vmax)
    bar.update(min(args.batch, len(paths) - start))
  bar.close()
  seconds = time.perf_counter() - t0
  csv_path = outputs.write_predictions(args.out, rows)
  summary = {"detector": os.path.abspath(args.detector), "images": len(rows),
             "anomalous": int(sum(bool(r[3]) for r in rows)), "unreadable": failed,
             "thresholds": detector.manifest["thresholds"], "predictions": csv_path,
             "maps": None if args.no_maps else os.path.join(args.out, "maps"),
             "seconds": round(seconds, 3),
             "images_per_s": round(len(rows) / max(seconds, 1e-9), 2)}
  files.write_json(os.path.join(args.out, "summary.json"), summary)
  if not rows:
    raise UserError(f"none of the {len(paths)} input images could be read (see "
                    f"{os.path.join(args.out, 'summary.json')})")
  return {**summary, "unreadable": len(failed),
          "scores": {"min": float(np.min([r[1] for r in rows])),
                     "max": float(np.max([r[1] for r in rows]))}}
