"""What people look at after `adjax evaluate`: result tables, heat-map overlays, t-SNE plots.

- Tables: per class and the mean, the `original` and `pretrained` feature kinds side by side
  with their difference, as Markdown (percent, like the paper's tables), CSV (one tidy row per
  class and metric) and JSON (raw floats).
- Heat-map overlays (PNG) of the images with the highest and the lowest image scores.
- t-SNE of normal and anomalous token features, one panel per feature kind (the paper's
  figure), original beside pretrained.

Side effects (files) live here; the numbers come from adjax.metrics. Matplotlib runs with
the Agg backend (no display).
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from adjax.io import files

KINDS = ("original", "pretrained")
MEAN = "mean"

# results[class_name][kind][metric] = value
Results = Mapping[str, Mapping[str, Mapping[str, float]]]


def _metric_names(results: Results) -> list[str]:
  names: list[str] = []
  for per_kind in results.values():
    for metrics in per_kind.values():
      for m in metrics:
        if m not in names:
          names.append(m)
  return names


def comparison(results: Results, kinds: Sequence[str] = KINDS) -> dict:
  """Per class and metric: each kind's value and the difference (last kind - first kind).

  Args:
    results: results[class][kind][metric] = value; a kind or metric may be missing (NaN).
    kinds: the two feature kinds to compare, in column order.

  Returns:
    {class: {metric: {kind_0: v, kind_1: v, "difference": v}}} with a final "mean" class
    (each kind's mean over classes, NaN ignored; the difference of those means).
  """
  if len(kinds) != 2:
    raise ValueError(f"kinds must name two feature kinds, got {kinds!r}")
  if not results:
    raise ValueError("results is empty")
  if MEAN in results:
    raise ValueError(f"'{MEAN}' is reserved for the mean row; rename that class")
  names = _metric_names(results)
  out: dict = {}
  for cls, per_kind in results.items():
    unknown = set(per_kind) - set(kinds)
    if unknown:
      raise ValueError(f"results[{cls!r}] has feature kinds {sorted(unknown)}; expected "
                       f"{list(kinds)}")
    out[cls] = {}
    for m in names:
      vals = [float(per_kind.get(k, {}).get(m, math.nan)) for k in kinds]
      out[cls][m] = {kinds[0]: vals[0], kinds[1]: vals[1], "difference": vals[1] - vals[0]}
  out[MEAN] = {}
  for m in names:
    means = []
    for k in kinds:
      col = np.array([out[c][m][k] for c in results], np.float64)
      means.append(float(np.nanmean(col)) if np.any(~np.isnan(col)) else math.nan)
    out[MEAN][m] = {kinds[0]: means[0], kinds[1]: means[1], "difference": means[1] - means[0]}
  return out


def _fmt(v: float, scale: float, digits: int, signed: bool = False) -> str:
  if v is None or math.isnan(v):
    return "-"
  return f"{v * scale:+.{digits}f}" if signed else f"{v * scale:.{digits}f}"


def to_markdown(table: Mapping, kinds: Sequence[str] = KINDS, *, scale: float = 100.0,
                digits: int = 1) -> str:
  """A Markdown table: one row per class (mean last), three columns per metric."""
  classes = list(table)
  names = list(next(iter(table.values())))
  head = ["class"]
  for m in names:
    head += [f"{m} {kinds[0]}", f"{m} {kinds[1]}", f"{m} diff"]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + [":-:"] * (3 * len(names)))
           + "|"]
  for c in classes:
    cells = [f"**{c}**" if c == MEAN else c]
    for m in names:
      e = table[c][m]
      cells += [_fmt(e[kinds[0]], scale, digits), _fmt(e[kinds[1]], scale, digits),
                _fmt(e["difference"], scale, digits, signed=True)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_tables(results: Results, out_dir: Any, *, stem: str = "results",
                 kinds: Sequence[str] = KINDS, title: str | None = None) -> dict[str, pathlib.Path]:
  """Writes `stem`.md, `stem`.csv and `stem`.json into out_dir.

  Args:
    results: results[class][kind][metric] = value (metrics in [0, 1]).
    out_dir: folder (created).
    stem: file name stem.
    kinds: the two feature kinds, in column order.
    title: optional Markdown heading.

  Returns:
    {"md", "csv", "json"}: the paths written.
  """
  table = comparison(results, kinds)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
  md = to_markdown(table, kinds)
  # Atomic, like every output: a full disk leaves the old table, not half of a new one.
  files.atomic_write(str(paths["md"]), lambda f: f.write((f"# {title}\n\n" if title else "")
                                                         + md), binary=False)

  def write_csv(f):
    w = csv.writer(f)
    w.writerow(["class", "metric", kinds[0], kinds[1], "difference"])
    for c, per_metric in table.items():
      for m, e in per_metric.items():
        w.writerow([c, m, repr(e[kinds[0]]), repr(e[kinds[1]]), repr(e["difference"])])
  files.atomic_write(str(paths["csv"]), write_csv, binary=False)
  clean = {c: {m: {k: (None if math.isnan(v) else v) for k, v in e.items()}
               for m, e in pm.items()} for c, pm in table.items()}
  files.atomic_write(str(paths["json"]), lambda f: f.write(json.dumps(clean, indent=2)),
                     binary=False)
  return paths


def write_scores_csv(path: Any, rows: Sequence[tuple[str, int, float]]) -> None:
  """Writes per-image scores as CSV (columns path, label, score), atomically; scores with
  repr's digits, so that they read back as the same floats."""
  def write(f):
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["path", "label", "score"])
    w.writerows([p, int(label), repr(float(score))] for p, label, score in rows)
  files.atomic_write(str(path), write, binary=False)


SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def summary_table(means: Mapping[str, Mapping[str, Mapping[str, float]]],
                  metrics: Sequence[str] = SUMMARY_METRICS) -> str:
  """Markdown: one row per method, per metric one column per feature kind (%, one decimal);
  `-` where a metric is NaN or absent (no pixel metrics without masks)."""
  kinds = [k for k in ("original", "residual", "pretrained")
           if any(k in per_kind for per_kind in means.values())]
  head = "| method | " + " | ".join(f"{k} {m.replace('_', ' ')}" for m in metrics
                                     for k in kinds) + " |"
  lines = [head, "|" + "---|" * (1 + len(metrics) * len(kinds))]
  for method, per_kind in means.items():
    cells = [_fmt(per_kind.get(k, {}).get(m, math.nan), 100.0, 1) for m in metrics
             for k in kinds]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def summary_text(summary: Mapping[str, Any]) -> str:
  """What `adjax evaluate` prints at the end: the mean table over the classes and, when some
  anomalous test images have no mask, over how many images the pixel metrics were computed."""
  means = summary.get("means") or {}
  if not means:
    return "no results"
  classes = summary.get("classes", [])
  lines = [f"mean over {len(classes)} classes ({', '.join(classes)}), %:", "",
           summary_table(means)]
  counts = summary.get("mask_counts") or {}
  unmasked = sum(c["anomalous_images"] - c["anomalous_with_masks"] for c in counts.values())
  if unmasked:
    used = sum(c["images_with_masks"] for c in counts.values())
    total = sum(c["test_images"] for c in counts.values())
    none = [name for name, c in counts.items()
            if c["anomalous_images"] and not c["anomalous_with_masks"]]
    lines += ["", f"pixel metrics over the {used} of {total} test images that have masks "
              f"(normal images count as masked; {unmasked} anomalous images have none)"
              + (f"; none for {', '.join(none)}" if none else "")]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- heat maps


def _to_uint8_rgb(image: np.ndarray, what: str) -> np.ndarray:
  img = np.asarray(image)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  if img.ndim != 3 or img.shape[-1] not in (1, 3):
    raise ValueError(f"{what} must be (H, W, 3) or (H, W), got shape {img.shape}")
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  if img.dtype != np.uint8:
    img = np.clip(np.asarray(img, np.float64), 0.0, 1.0) * 255.0 + 0.5
    img = img.astype(np.uint8)
  return img


def overlay(image: np.ndarray, heat: np.ndarray, *, vmin: float, vmax: float,
            alpha: float = 0.5, mask: np.ndarray | None = None,
            cmap: str = "jet") -> np.ndarray:
  """Blends a colour-mapped heat map onto an image; outlines the mask in white.

  Args:
    image: (H, W, 3) uint8, or float in [0, 1].
    heat: (H, W) scores.
    vmin, vmax: score range mapped onto the colour map.
    alpha: heat-map weight.
    mask: optional (H, W) ground truth, drawn as its boundary.
    cmap: matplotlib colour map name.

  Returns:
    (H, W, 3) uint8.
  """
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import colormaps

  img = _to_uint8_rgb(image, "image").astype(np.float64)
  heat = np.asarray(heat, np.float64)
  if heat.shape != img.shape[:2]:
    raise ValueError(f"heat map shape {heat.shape} differs from the image's {img.shape[:2]}")
  norm = np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
  colour = colormaps[cmap](norm)[..., :3] * 255.0
  out = (1.0 - alpha) * img + alpha * colour
  if mask is not None:
    from skimage.segmentation import find_boundaries
    edge = find_boundaries(np.asarray(mask) > 0, mode="inner")
    out[edge] = 255.0
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def save_overlays(images: Any, maps: Any, scores: Any, out_dir: Any, *, num: int = 4,
                  names: Sequence[str] | None = None, masks: Any = None,
                  alpha: float = 0.5) -> list[pathlib.Path]:
  """Saves overlays of the `num` highest- and `num` lowest-scoring images.

  Every overlay uses the same colour scale (the min and max over all `maps`), so they compare.
  Files: highest_{rank:02d}_{name}.png and lowest_{rank:02d}_{name}.png; each file holds the
  image beside its overlay.

  Args:
    images: (N, H, W, 3) uint8 or float in [0, 1] (or (N, H, W) grey).
    maps: (N, H, W) anomaly maps on the image grid.
    scores: (N,) image scores.
    out_dir: folder (created).
    num: images per end.
    names: optional (N,) names for the files (default: the index).
    masks: optional (N, H, W) ground truth.
    alpha: heat-map weight.

  Returns:
    The paths written, highest first.
  """
  from PIL import Image

  images = np.asarray(images)
  maps = np.asarray(maps, np.float64)
  scores = np.asarray(scores, np.float64)
  n = maps.shape[0]
  if images.shape[0] != n or scores.shape != (n,):
    raise ValueError(f"images ({images.shape[0]}), maps ({n}) and scores {scores.shape} must "
                     "describe the same images")
  if names is not None and len(names) != n:
    raise ValueError(f"names has {len(names)} entries for {n} images")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  vmin, vmax = float(maps.min()), float(maps.max())
  order = np.argsort(-scores, kind="stable")
  k = min(num, n)
  picks = [("highest", r, i) for r, i in enumerate(order[:k])]
  picks += [("lowest", r, i) for r, i in enumerate(order[::-1][:k])]
  paths = []
  for end, rank, i in picks:
    name = str(names[i]) if names is not None else f"{i:05d}"
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    img = _to_uint8_rgb(images[i], f"images[{i}]")
    ov = overlay(img, maps[i], vmin=vmin, vmax=vmax, alpha=alpha,
                 mask=None if masks is None else np.asarray(masks)[i])
    path = out / f"{end}_{rank:02d}_{name}.png"
    picture = Image.fromarray(np.concatenate([img, ov], axis=1))
    files.atomic_write(str(path), lambda f, picture=picture: picture.save(f, format="PNG"))
    paths.append(path)
  return paths


# ----------------------------------------------------------------------------- t-SNE


def tsne_embed(features: np.ndarray, *, seed: int = 0, perplexity: float = 30.0,
               max_iter: int = 1000) -> np.ndarray:
  """2-D t-SNE (scikit-learn, PCA init, `max_iter` >= 250 iterations) of (n, C) features."""
  from sklearn.manifold import TSNE

  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 3:
    raise ValueError(f"t-SNE needs (n >= 3, C) features, got shape {x.shape}")
  perp = float(min(perplexity, (x.shape[0] - 1) / 3.0))
  return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed,
              max_iter=max_iter).fit_transform(x)


def plot_tsne(panels: Mapping[str, tuple[Any, Any]], path: Any, *, max_points: int = 2000,
              seed: int = 0, perplexity: float = 30.0, max_iter: int = 1000,
              title: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """t-SNE of normal vs anomalous token features, one panel per feature kind, side by side.

  Args:
    panels: {kind: (features (n, C), labels (n,) in {0, 1})}, e.g. original and pretrained
      token features of the same test images with their token labels.
    path: PNG file to write.
    max_points: at most this many tokens per panel, drawn at random, half from each label
      when there are enough.
    seed: sampling and t-SNE seed.
    perplexity: t-SNE perplexity (capped for small samples).
    max_iter: t-SNE iterations.
    title: optional figure title.

  Returns:
    {kind: (embedding (m, 2), labels (m,))} of the points drawn.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rng = np.random.default_rng(seed)
  result = {}
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
  for ax, (kind, (feats, labels)) in zip(axes[0], panels.items()):
    feats = np.asarray(feats).reshape(-1, np.asarray(feats).shape[-1])
    labels = np.asarray(labels).reshape(-1).astype(int)
    if feats.shape[0] != labels.shape[0]:
      raise ValueError(f"panel {kind!r}: {feats.shape[0]} features but {labels.shape[0]} "
                       "labels")
    idx_n, idx_a = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    take_a = min(idx_a.size, max_points // 2)
    take_n = min(idx_n.size, max_points - take_a)
    idx = np.concatenate([rng.choice(idx_n, take_n, replace=False),
                          rng.choice(idx_a, take_a, replace=False)])
    emb = tsne_embed(feats[idx], seed=seed, perplexity=perplexity, max_iter=max_iter)
    lab = labels[idx]
    ax.scatter(emb[lab == 0, 0], emb[lab == 0, 1], s=4, c="tab:blue", label="normal")
    ax.scatter(emb[lab == 1, 0], emb[lab == 1, 1], s=4, c="tab:red", label="anomalous")
    ax.set_title(kind)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", markerscale=3)
    result[kind] = (emb, lab)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  files.atomic_write(str(path), lambda f: fig.savefig(f, format="png", dpi=120))
  plt.close(fig)
  return result
