"""Throughput of the pretraining pipeline (images/s) with 1 and 2 grain worker processes.

Runs on the embedded dataset (generated once into --data-dir) at the paper's input size and
prints one JSON line. An "image" is one training example: two augmented views of one image,
its mask and token labels, and its n_shot reference images (n_shot drawn from {1, 4, 8}).

  python benchmarks/bench_pipeline.py [--data-dir /tmp/adjax_embedded] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rate(records, workers: int, args) -> float:
  from data_pipelines.pretrain_pipeline import make_pretrain_loader
  loader = make_pretrain_loader(records, image_size=args.image_size, batch_size=args.batch_size,
                                num_workers=workers, seed=0)
  it = iter(loader)
  for _ in range(args.warmup):  # Worker start-up and first batches are not throughput.
    next(it)
  start = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  elapsed = time.perf_counter() - start
  it.close()
  return args.batches * args.batch_size / elapsed


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data-dir", default=os.path.join("/tmp", "adjax_embedded_bench"))
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  args = p.parse_args()
  from data_pipelines.embedded import generate_embedded_dataset
  from data_pipelines.index import build_index
  summary = generate_embedded_dataset(args.data_dir, image_size=args.image_size)
  records = build_index([("realiad", summary["pretrain_root"])])
  result = {"benchmark": "pretrain_pipeline", "image_size": args.image_size,
            "batch_size": args.batch_size, "batches": args.batches, "records": len(records),
            "cpus": os.cpu_count()}
  for workers in (1, 2):
    result[f"images_per_s_{workers}_worker{'s' if workers > 1 else ''}"] = round(
        _rate(records, workers, args), 1)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
