"""`adjax demo` end to end at a tiny size: dataset, real EfficientNet-Lite0 weights, centres,
pretraining, evaluation of three methods on three feature kinds, report and results files."""

import json
import os

from adjax.demo import run_demo, summary_table


def test_demo_runs_end_to_end(tmp_path, capsys):
  out = run_demo({
      "workdir": str(tmp_path / "run"),
      "demo.data_dir": str(tmp_path / "data"),
      "demo.pretrain_classes": "2", "demo.eval_classes": "1", "demo.images_per_class": "8",
      "image_size": "64", "optim.max_steps": "3", "data.batch_size": "4",
      "projector.num_ref_tokens": "32",
  })
  results = json.load(open(out["results"]))
  assert results["pretraining"]["steps"] == 3
  means = results["means"]
  assert set(means) == {"featurenorm", "patchcore", "padim"}
  for method, per_kind in means.items():
    assert set(per_kind) == {"original", "residual", "pretrained"}
    for metrics in per_kind.values():
      assert 0.0 <= metrics["image_auroc"] <= 1.0
  report = open(out["report"]).read()
  assert summary_table(means) in report and "loss_curves.png" in report
  assert os.path.isfile(os.path.join(os.path.dirname(out["report"]), "loss_curves.png"))
  assert summary_table(means) in capsys.readouterr().out
