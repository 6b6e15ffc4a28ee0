"""The detector's cost on a production-like setting: fit time and predict throughput of
`adjax.Detector` (PatchCore and FeatureNorm on EfficientNet-Lite0's ImageNet weights at 224 px,
original and pretrained features), against `adjax evaluate` on the same files.

Prints one JSON line. The images are the embedded dataset (generated, deterministic photographs
of textured objects; content does not change the cost). The "pretrained" kind uses a projector
initialised at random and imported into a run folder (`adjax import`'s path): its cost is a
trained one's. For each method and feature kind:

- `fit_s`: `Detector.fit` on the training folder (image loading, backbone, the method's fit,
  scoring the held-out share, thresholds), compile time included, as a user meets it once;
- `predict_images_per_s`: steady-state `Detector.predict` on already-loaded test images (the
  second pass over them: the first compiles), and `predict_with_loading_images_per_s`, the same
  with reading and preprocessing the files (`load_images`) counted, as `adjax predict` does;
- `evaluate_style_s_per_image`: the same images scored the way `adjax evaluate` scores a class
  (features in `eval.batch_size` chunks, then one scoring call over all of them), steady state,
  beside `predict_s_per_image` (`predict` scores `--batch` images per call so that its memory is
  bounded);
- `evaluate_s`: `adjax evaluate` (the library call) of the same method and feature kind on the
  same class (fit + every test image + metrics), after the detector's runs (it reuses their
  compiled programs), beside `fit_s + predict_s`.

  python benchmarks/bench_predict.py                        # 48 train, 48 test images
  python benchmarks/bench_predict.py --images 96 --batch 32
"""

from __future__ import annotations

import argparse
import itertools
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


def _random_projector_run(root: str, config, num_heads: int) -> str:
  """A run folder holding a randomly initialised projector for EfficientNet-Lite0's taps."""
  from adjax.from_config import build_backbone
  from adjax.interop import import_projector
  from adjax.models.projector import init_projector
  from adjax.models.projector_torch import projector_to_torch
  backbone, _ = build_backbone(config, None)
  params = init_projector(jax.random.PRNGKey(0), backbone.level_dims, num_heads=num_heads,
                          num_ref_tokens=int(config.projector.num_ref_tokens))
  path = os.path.join(root, "random_projector.npz")
  np.savez(path, **projector_to_torch(params))
  run = os.path.join(root, "run")
  import_projector(path, run, backbone=config.backbone.name, which="both",
                   overrides=[("projector.num_heads", num_heads),
                              ("image_size", config.image_size)])
  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=48,
                      help="training images of the generated class (its test set is as large)")
  parser.add_argument("--size", type=int, default=224, help="image side, pixels")
  parser.add_argument("--batch", type=int, default=16, help="predict batch")
  parser.add_argument("--methods", default="patchcore,featurenorm")
  parser.add_argument("--features", default="original,pretrained",
                      help="comma-separated feature kinds: original, residual, pretrained")
  parser.add_argument("--num-heads", type=int, default=8,
                      help="projector heads for the pretrained kind (divides 24, 40, 112, 320)")
  args = parser.parse_args()

  from adjax.configs import default_config
  from adjax.detector import Detector
  from adjax.evaluate import evaluate
  from data_pipelines.embedded import generate_embedded_dataset
  from data_pipelines.image_files import list_images, load_images

  def config_for(method: str, kind: str):
    c = default_config()
    c.backbone.name = "efficientnet-lite0"
    c.image_size = args.size
    c.train.dtype = "float32"
    c.projector.num_heads = args.num_heads
    c.eval.batch_size = args.batch
    c.eval.methods = (method,)
    c.eval.features = (kind,)
    c.eval.tsne = False
    return c

  results = []
  with tempfile.TemporaryDirectory() as root:
    summary = generate_embedded_dataset(root, image_size=args.size, pretrain_classes=1,
                                        eval_classes=1, images_per_class=args.images)
    data = os.path.join(summary["eval_root"], summary["eval_classes"][0])
    train = os.path.join(data, "train", "good")
    test_paths = list_images([os.path.join(data, "test")])
    kinds = args.features.split(",")
    run = _random_projector_run(root, config_for("featurenorm", "pretrained"), args.num_heads)
    for kind, method in itertools.product(kinds, args.methods.split(",")):
      workdir = run if kind == "pretrained" else None
      fit_s, detector = _seconds(lambda: Detector.fit(
          [train], method=method, features=kind, workdir=workdir,
          config=config_for(method, kind)))
      test = load_images(test_paths, args.size)
      detector.predict(test.images, batch=args.batch)          # compiles
      predict_s, _ = _seconds(lambda: detector.predict(test.images, batch=args.batch))
      loaded_s, _ = _seconds(lambda: detector.predict(
          load_images(test_paths, args.size).images, batch=args.batch))
      detector.raw_scores(test.images)                           # compiles the one-call shape
      whole_s, _ = _seconds(lambda: detector.raw_scores(test.images))
      config = config_for(method, kind)
      config.eval.format = "mvtec"
      config.eval.root = os.path.dirname(data)
      out = os.path.join(root, f"eval_{method}_{kind}")
      evaluate_s, _ = _seconds(lambda: evaluate(config, workdir, out, progress=False))
      n = len(test_paths)
      results.append({
          "method": method, "features": kind,
          "fit_images": detector.manifest["train"]["fit_images"], "test_images": n,
          "fit_s": round(fit_s, 2), "predict_s": round(predict_s, 3),
          "predict_images_per_s": round(n / predict_s, 2),
          "predict_with_loading_images_per_s": round(n / loaded_s, 2),
          "predict_s_per_image": round(predict_s / n, 4),
          "evaluate_style_s_per_image": round(whole_s / n, 4),
          "evaluate_s": round(evaluate_s, 2), "fit_plus_predict_s": round(fit_s + predict_s, 2)})
  print(json.dumps({
      "benchmark": "predict", "backbone": "efficientnet-lite0", "image_size": args.size,
      "batch": args.batch, "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
      "processor": platform.processor() or platform.machine(), "jax": jax.__version__,
      "numpy": np.__version__, "results": results}))


if __name__ == "__main__":
  main()
