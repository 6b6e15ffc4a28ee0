"""`adjax collect`: a sweep's results as one table (CSV and Markdown) and a plot, from the
points' results.json files (adjax/sweep.py runs the points)."""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Mapping, Sequence

from adjax import run_layout
from adjax.io import files
from adjax.errors import UserError
from adjax.sweep import SWEEP_FILE


def flatten_metrics(results: Any, prefix: str = "") -> dict[str, float]:
  """Nested results -> {"a/b/c": number}; non-numeric leaves are left out."""
  out: dict[str, float] = {}
  if isinstance(results, Mapping):
    for key, value in results.items():
      out.update(flatten_metrics(value, f"{prefix}{key}/"))
  elif isinstance(results, bool):
    pass
  elif isinstance(results, (int, float)):
    out[prefix.rstrip("/")] = float(results)
  elif hasattr(results, "item") and getattr(results, "size", 2) == 1:  # numpy scalars
    try:
      out[prefix.rstrip("/")] = float(results.item())
    except (TypeError, ValueError):
      pass
  return out


def _read_rows(sweep_dir: str) -> tuple[list[dict[str, Any]], list[str], list[str]]:
  planned: list[dict[str, Any]] = []
  plan_file = os.path.join(sweep_dir, SWEEP_FILE)
  if os.path.isfile(plan_file):
    plan = files.read_json(plan_file)
    planned = [p for p in plan.get("points", []) if isinstance(p, dict) and "name" in p]
  names = [p["name"] for p in planned]
  for entry in sorted(os.listdir(sweep_dir)):
    if entry not in names and os.path.isfile(run_layout.results_path(
        os.path.join(sweep_dir, entry))):
      names.append(entry)
  overrides_of = {p["name"]: p.get("overrides", {}) for p in planned}
  rows, override_keys, metric_keys = [], [], []
  for name in names:
    record_file = run_layout.results_path(os.path.join(sweep_dir, name))
    record: dict[str, Any] = {}
    if os.path.isfile(record_file):
      try:
        record = files.read_json(record_file)
      except ValueError as err:
        record = {"status": "unreadable", "error": str(err)}
    if not isinstance(record, dict):
      record = {"status": "unreadable"}
    overrides = record.get("overrides", overrides_of.get(name, {})) or {}
    status = record.get("status", "pending" if not record else "done")
    # A results.json the job wrote by itself (no sweep record around it) is the results.
    results = record.get("results", {} if "status" in record else record)
    metrics = flatten_metrics(results)
    for key in overrides:
      if key not in override_keys:
        override_keys.append(key)
    for key in metrics:
      if key not in metric_keys:
        metric_keys.append(key)
    rows.append({"point": name, "status": status, "seconds": record.get("seconds"),
                 "overrides": overrides, "metrics": metrics, "error": record.get("error", "")})
  return rows, override_keys, metric_keys


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return f"{value:.4g}" if math.isfinite(value) else str(value)
  if isinstance(value, (list, tuple)):
    return ",".join(_cell(v) for v in value)
  return str(value)


def _pick_plot_metrics(metric_keys: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
  if wanted:
    missing = [m for m in wanted if m not in metric_keys]
    if missing:
      raise UserError(f"no metric {missing[0]!r} in the results; metrics: "
                      f"{', '.join(metric_keys) or 'none'}")
    return list(wanted)
  preferred = [m for m in metric_keys if "auroc" in m.lower()]
  return (preferred or list(metric_keys))[:4]


def collect(sweep_dir: str, *, out_dir: str | None = None,
            metrics: Sequence[str] | None = None) -> dict[str, Any]:
  """Gathers every point's results.json into one table (Markdown, CSV) and one plot (PNG).

  Args:
    sweep_dir: the sweep's folder (with sweep.json and one subfolder per point).
    out_dir: where to write results.md/.csv/.png (default `sweep_dir`).
    metrics: metric columns to plot (default: up to 4 AUROC columns, else the first 4).

  Returns:
    {"rows": n, "markdown": path, "csv": path, "plot": path or None, "columns": [...]}.

  Raises:
    UserError: the folder does not exist or holds no sweep points.
  """
  if not os.path.isdir(sweep_dir):
    raise UserError(f"sweep folder not found: {sweep_dir}")
  rows, override_keys, metric_keys = _read_rows(sweep_dir)
  if not rows:
    raise UserError(f"{sweep_dir} holds no sweep points (no sweep.json, no <point>/results.json)")
  out_dir = out_dir or sweep_dir
  os.makedirs(out_dir, exist_ok=True)
  header = ["point", "status", "seconds", *override_keys, *metric_keys, "error"]

  def values(row):
    return [row["point"], row["status"], row["seconds"],
            *[row["overrides"].get(k) for k in override_keys],
            *[row["metrics"].get(k) for k in metric_keys], row["error"]]

  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  for row in rows:
    writer.writerow(["" if v is None else (_cell(v) if isinstance(v, (bool, list, tuple))
                                           else v) for v in values(row)])
  csv_path = os.path.join(out_dir, "results.csv")
  files.atomic_write(csv_path, lambda f: f.write(buffer.getvalue()), binary=False)

  escape = lambda text: text.replace("|", "\\|").replace("\n", " ")
  lines = ["| " + " | ".join(escape(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  for row in rows:
    cells = [_cell(v) for v in values(row)]
    cells[-1] = cells[-1][:120]
    lines.append("| " + " | ".join(escape(c) for c in cells) + " |")
  md_path = os.path.join(out_dir, "results.md")
  files.atomic_write(md_path, lambda f: f.write("\n".join(lines) + "\n"), binary=False)

  plotted = _pick_plot_metrics(metric_keys, metrics)
  plot_path = os.path.join(out_dir, "results.png") if plotted else None
  if plot_path:
    _plot(rows, plotted, plot_path, os.path.basename(os.path.abspath(sweep_dir)))
  return {"rows": len(rows), "markdown": md_path, "csv": csv_path, "plot": plot_path,
          "columns": header, "plotted": plotted}


def _plot(rows: Sequence[dict[str, Any]], metrics: Sequence[str], path: str, title: str) -> None:
  """One grouped horizontal bar chart: a group per point, a bar per metric (Agg, no display)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(8, 1.2 + 0.45 * len(rows) * max(1, len(metrics)) ** 0.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  height = 0.8 / len(metrics)
  for j, metric in enumerate(metrics):
    ys = [i + (j - (len(metrics) - 1) / 2) * height for i in range(len(rows))]
    xs = [row["metrics"].get(metric, float("nan")) for row in rows]
    ax.barh(ys, xs, height=height, label=metric)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels([f"{r['point']}" + ("" if r["status"] == "done" else f" ({r['status']})")
                      for r in rows])
  ax.invert_yaxis()
  ax.set_title(title)
  ax.legend(fontsize="small", loc="best")
  fig.tight_layout()
  files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
