"""The detector's cost on a production-like setting: fit time and predict throughput of
`adjax.Detector` (PatchCore and FeatureNorm on EfficientNet-Lite0's ImageNet weights at 224 px),
against `adjax evaluate` on the same files.

Prints one JSON line. The images are the embedded dataset (generated, deterministic photographs
of textured objects; content does not change the cost). For each method:

- `fit_s`: `Detector.fit` on the training folder (image loading, backbone, the method's fit,
  scoring the held-out share, thresholds), compile time included, as a user meets it once;
- `predict_images_per_s`: steady-state `Detector.predict` on already-loaded test images (the
  second pass over them: the first compiles), and `predict_with_loading_images_per_s`, the same
  with reading and preprocessing the files (`load_images`) counted, as `adjax predict` does;
- `evaluate_s`: `adjax evaluate` (the library call) of the same method and feature kind on the
  same class (fit + every test image + metrics), and its images per second over the test set.

  python benchmarks/bench_predict.py                        # 48 train, 48 test images
  python benchmarks/bench_predict.py --images 96 --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np


def _seconds(fn):
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=48,
                      help="training images of the generated class (its test set is as large)")
  parser.add_argument("--size", type=int, default=224, help="image side, pixels")
  parser.add_argument("--batch", type=int, default=16, help="predict batch")
  parser.add_argument("--methods", default="patchcore,featurenorm")
  parser.add_argument("--features", default="original", choices=("original", "residual"))
  args = parser.parse_args()

  from adjax.configs import default_config
  from adjax.detector import Detector
  from adjax.evaluate import evaluate
  from data_pipelines.embedded import generate_embedded_dataset
  from data_pipelines.image_files import list_images, load_images

  def config_for(method: str):
    c = default_config()
    c.backbone.name = "efficientnet-lite0"
    c.image_size = args.size
    c.train.dtype = "float32"
    c.eval.batch_size = args.batch
    c.eval.methods = (method,)
    c.eval.features = (args.features,)
    c.eval.tsne = False
    return c

  results = []
  with tempfile.TemporaryDirectory() as root:
    summary = generate_embedded_dataset(root, image_size=args.size, pretrain_classes=1,
                                        eval_classes=1, images_per_class=args.images)
    data = os.path.join(summary["eval_root"], summary["eval_classes"][0])
    train = os.path.join(data, "train", "good")
    test_paths = list_images([os.path.join(data, "test")])
    for method in args.methods.split(","):
      fit_s, detector = _seconds(lambda: Detector.fit([train], method=method,
                                                      features=args.features,
                                                      config=config_for(method)))
      test = load_images(test_paths, args.size)
      detector.predict(test.images, batch=args.batch)          # compiles
      predict_s, _ = _seconds(lambda: detector.predict(test.images, batch=args.batch))
      loaded_s, _ = _seconds(lambda: detector.predict(
          load_images(test_paths, args.size).images, batch=args.batch))
      config = config_for(method)
      config.eval.format = "mvtec"
      config.eval.root = os.path.dirname(data)
      out = os.path.join(root, f"eval_{method}")
      evaluate_s, _ = _seconds(lambda: evaluate(config, None, out, progress=False))
      results.append({
          "method": method, "features": args.features,
          "fit_images": detector.manifest["train"]["fit_images"],
          "test_images": len(test_paths), "fit_s": round(fit_s, 2),
          "predict_images_per_s": round(len(test_paths) / predict_s, 2),
          "predict_with_loading_images_per_s": round(len(test_paths) / loaded_s, 2),
          "evaluate_s": round(evaluate_s, 2),
          "evaluate_test_images_per_s": round(len(test_paths) / evaluate_s, 2)})
  print(json.dumps({
      "benchmark": "predict", "backbone": "efficientnet-lite0", "image_size": args.size,
      "batch": args.batch, "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
      "processor": platform.processor() or platform.machine(), "jax": jax.__version__,
      "numpy": np.__version__, "results": results}))


if __name__ == "__main__":
  main()
