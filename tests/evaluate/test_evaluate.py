"""Evaluation plumbing: reference images, classes with one test label, the t-SNE panel."""

import logging
import math
import types

import numpy as np
import pytest

from adjax.evaluate import loop as evaluate_lib


def _levels(images: int, side: int = 2, dim: int = 3):
  """One level whose every token of image i equals i (so rows tell which image they came from)."""
  values = np.arange(images, dtype=np.float32)[:, None, None, None]
  return [np.broadcast_to(values, (images, side, side, dim)).copy()]


def test_references_are_the_first_normal_training_images():
  (refs,) = evaluate_lib.reference_features(_levels(5), 2,
                                            np.array([True, False, True, True, False]))
  # Image 1 is an anomalous "noisy" training image: it is never a reference.
  assert sorted(set(refs[:, 0].tolist())) == [0.0, 2.0]
  assert refs.shape == (2 * 4, 3)
  (all_refs,) = evaluate_lib.reference_features(_levels(5), 2)
  assert sorted(set(all_refs[:, 0].tolist())) == [0.0, 1.0]


def test_every_training_image_a_reference_is_logged(caplog):
  with caplog.at_level(logging.WARNING, logger="adjax.evaluate"):
    evaluate_lib.reference_features(_levels(3), 8, class_name="bottle")
  assert "bottle" in caplog.text and "every training residual is zero" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="adjax.evaluate"):
    evaluate_lib.reference_features(_levels(9), 8, class_name="bottle")
  assert not caplog.text
  with pytest.raises(ValueError, match="'bottle': no normal training image"):
    evaluate_lib.reference_features(_levels(2), 1, np.array([False, False]), "bottle")


def _score(labels, masks):
  rng = np.random.default_rng(0)
  train = [rng.standard_normal((3, 4, 4, 8)).astype(np.float32)]
  test = [rng.standard_normal((len(labels), 4, 4, 8)).astype(np.float32)]
  return evaluate_lib.score_method("featurenorm", {}, train, test, 16, 0,
                                   np.asarray(labels, np.int32), masks)


def test_a_class_with_one_test_label_gets_nan_image_metrics(caplog):
  with caplog.at_level(logging.WARNING, logger="adjax.evaluate"):
    metrics, scores, maps, _ = _score([0, 0, 0], np.zeros((3, 16, 16), np.uint8))
  assert set(metrics) == {"image_auroc", "image_ap", "image_f1_max"}
  assert all(math.isnan(v) for v in metrics.values())
  assert "only normal images" in caplog.text
  assert scores.shape == (3,) and maps.shape == (3, 16, 16)
  # All anomalous: the pixel metrics are still defined and computed.
  masks = np.zeros((2, 16, 16), np.uint8)
  masks[:, 4:8, 4:8] = 1
  metrics, *_ = _score([1, 1], masks)
  assert math.isnan(metrics["image_auroc"])
  assert 0.0 <= metrics["pixel_auroc"] <= 1.0 and 0.0 <= metrics["pixel_aupro"] <= 1.0
  # Both labels: real numbers.
  metrics, *_ = _score([0, 1], masks)
  assert 0.0 <= metrics["image_auroc"] <= 1.0
  # The per-class means leave a NaN class out instead of becoming NaN.
  means = evaluate_lib.mean_table({"featurenorm": {"a": {"original": {"image_auroc": 0.5}},
                                                   "b": {"original": {"image_auroc": math.nan}}}})
  assert means["featurenorm"]["original"]["image_auroc"] == 0.5


def test_tsne_uses_whichever_projector_was_loaded(tmp_path, monkeypatch):
  # PatchCore alone loads only the angle-selected projector: the panel must use it.
  from adjax.evaluate import reporting
  drawn = {}
  monkeypatch.setattr(reporting, "plot_tsne",
                      lambda panels, path, **kw: drawn.update(panels=panels, path=path))
  rng = np.random.default_rng(0)
  side, images = 4, 6
  def levels():
    return [rng.standard_normal((images, side, side, 8)).astype(np.float32)]
  features = {"original": (levels(), levels()), "pretrained:angle": (levels(), levels())}
  masks = np.zeros((images, 16, 16), np.uint8)
  masks[:3, :8, :8] = 1
  backbone = types.SimpleNamespace(level_strides=(4,))
  config = types.SimpleNamespace(seed=0)
  evaluate_lib._tsne(features, ("original", "pretrained"), masks, backbone, str(tmp_path),
                     "bottle", config)
  tokens, labels = drawn["panels"]["pretrained"]
  np.testing.assert_array_equal(tokens, features["pretrained:angle"][1][0].reshape(-1, 8))
  assert labels.sum() == 3 * 4 and drawn["path"].endswith("tsne_bottle.png")
  # With both loaded, the norm-selected one (FeatureNorm's) is shown.
  features["pretrained:norm"] = (levels(), levels())
  evaluate_lib._tsne(features, ("original", "pretrained"), masks, backbone, str(tmp_path),
                     "bottle", config)
  np.testing.assert_array_equal(drawn["panels"]["pretrained"][0],
                                features["pretrained:norm"][1][0].reshape(-1, 8))


def test_aligned_references_match_paths_across_machines():
  train = [f"/here/btad/01/train/ok/{i:04d}.bmp" for i in range(4)]
  test = ["/here/btad/01/test/ko/0000.bmp", "/here/btad/01/test/ok/0000.bmp"]
  table = {"/data/yxc/btad/01/test/ko/0000.bmp": ["/data/yxc/btad/01/train/ok/0003.bmp",
                                                  "/data/yxc/btad/01/train/ok/0001.bmp"],
           "/data/yxc/btad/01/test/ok/0000.bmp": ["/data/yxc/btad/01/train/ok/0000.bmp"]}
  import json
  import tempfile
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(table, f)
  assert evaluate_lib.aligned_reference_indices(f.name, "01", test, train) == [[3, 1], [0]]
  with pytest.raises(ValueError, match="list nothing for test image /here/btad/01/test/x.bmp"):
    evaluate_lib.aligned_reference_indices(f.name, "01", ["/here/btad/01/test/x.bmp"], train)
  with pytest.raises(ValueError, match="0003.bmp .* is not among the class's training images"):
    evaluate_lib.aligned_reference_indices(f.name, "01", test, train[:3])


def test_aligned_residuals_use_each_images_own_references():
  # Each test token minus its most cosine-similar token among its own references' tokens
  # (computed here by brute force).
  rng = np.random.default_rng(0)
  train = [rng.standard_normal((5, 2, 3, 8)).astype(np.float32)]
  test = [rng.standard_normal((3, 2, 3, 8)).astype(np.float32)]
  references = [[0, 4], [2], [1, 3, 4]]
  maker = evaluate_lib.FeatureMaker(None, None)
  (got,) = maker.aligned_residual_levels(test, train, references)
  for i, refs in enumerate(references):
    bank = train[0][refs].reshape(-1, 8)
    tokens = test[0][i].reshape(-1, 8)
    cos = (tokens / np.linalg.norm(tokens, axis=1, keepdims=True)) @ \
        (bank / np.linalg.norm(bank, axis=1, keepdims=True)).T
    want = tokens - bank[cos.argmax(1)]
    np.testing.assert_allclose(got[i].reshape(-1, 8), want, rtol=1e-5, atol=1e-5)


def test_glass_on_residual_features_runs_as_the_reference_runs_it():
  user = {"glass": {"epochs": 3}, "patchcore": {"coreset_ratio": 0.5}}
  assert evaluate_lib.method_settings_for("glass", "original", user) == {"epochs": 3}
  for kind in ("residual", "pretrained"):
    assert evaluate_lib.method_settings_for("glass", kind, user) == {
        "projection": False, "noise_std": 0.005, "epochs": 3}
  # The user's own settings win.
  assert evaluate_lib.method_settings_for("glass", "pretrained", {"glass": {"noise_std": 0.01}})[
      "noise_std"] == 0.01
  assert evaluate_lib.method_settings_for("patchcore", "pretrained", user) == {
      "coreset_ratio": 0.5}


def test_best_over_test_checks_is_each_metrics_best():
  """eval.best_over_test: the reference's protocol for CFLOW and GLASS, each metric's best over
  the test-set checks made every test_every epochs (recomputed here check by check)."""
  from adjax import metrics as metrics_lib
  from adjax.methods import get_method
  rng = np.random.default_rng(0)
  train = [rng.standard_normal((6, 4, 4, 8)).astype(np.float32) for _ in range(3)]
  test = [rng.standard_normal((6, 4, 4, 8)).astype(np.float32) for _ in range(3)]
  labels = np.array([0, 0, 0, 1, 1, 1], np.int32)
  test[0][3:, 1:3, 1:3] += 2.0
  masks = np.zeros((6, 16, 16), np.uint8)
  masks[3:, 4:12, 4:12] = 1
  settings = dict(coupling_blocks=2, cond_dim=8, epochs=6, fiber_batch=32, test_every=2)
  best, scores, maps, state = evaluate_lib.score_method(
      "cflow", settings, train, test, 16, 0, labels, masks, best_over_test=True)
  method = get_method("cflow", **settings)
  import jax
  checks = []
  for s in method.fit_in_rounds(train, jax.random.PRNGKey(0)):
    sc, mp = method.score(s, test, 16)
    row = {f"image_{k}": v for k, v in metrics_lib.image_metrics(labels, np.asarray(sc)).items()}
    row.update({f"pixel_{k}": v for k, v in metrics_lib.pixel_metrics(masks, np.asarray(mp)
                                                                      ).items()})
    checks.append(row)
  assert len(checks) == 3 and state["epochs"] == 6
  for key, value in best.items():
    assert value == pytest.approx(max(row[key] for row in checks), abs=1e-9), key
  # The default is one evaluation after training: the last check.
  last, *_ = evaluate_lib.score_method("cflow", settings, train, test, 16, 0, labels, masks)
  for key, value in last.items():
    assert value == pytest.approx(checks[-1][key], abs=1e-9), key
    assert best[key] >= value


def test_class_resize_overrides_the_runs_resize():
  import ml_collections
  ev = ml_collections.ConfigDict({"resize": 0, "class_resize": {"wood": 256}})
  assert evaluate_lib.class_resize(ev, "wood") == 256
  assert evaluate_lib.class_resize(ev, "carpet") is None
  ev.resize = 240
  assert evaluate_lib.class_resize(ev, "carpet") == 240
  assert evaluate_lib.class_resize(ev, "wood") == 256


def test_partial_results_are_kept_only_for_the_same_settings(tmp_path):
  """results.partial.json: read back (NaN included) under settings that give the same numbers
  (paths, batching, classes, methods, kinds may change; a projector only one run loaded is no
  difference); refused when a setting, the backbone's or a shared projector's parameters
  differ. Results outside a run are carried in the file; a per-dataset method's only count for
  the classes it was fitted on."""
  from adjax import configs
  from adjax.evaluate import progress as eval_progress
  config = configs.default_config()
  backbone = {"stem": {"w": np.ones((2, 2))}}
  projectors = {"norm": {"l1_proj": {"w": np.arange(6.0).reshape(2, 3)}}}
  settings = eval_progress.evaluation_settings(config, backbone, projectors)
  first = eval_progress.EvaluationProgress(str(tmp_path), settings, ("cflow", "uniad"),
                                           ["bottle", "cable"], ("original",), ("uniad",))
  assert first.resumed == 0 and not first.done("cflow", "bottle")
  first.scored("cflow", "bottle", "original", {"image_auroc": float("nan"), "x": 0.5},
               np.array([0.25, 1.5]))
  for c in ("bottle", "cable"):
    first.scored("uniad", c, "original", {"x": 0.7}, np.array([0.5]))
  first.fitted("uniad")
  first.save()
  moved = configs.default_config()
  moved.eval.root, moved.backbone.weights, moved.eval.batch_size = "/elsewhere", "/w.pth", 4
  moved.eval.methods, moved.eval.classes = ("cflow", "glass"), "bottle,cable"
  more = {**projectors, "angle": {"l1_proj": {"w": np.zeros((2, 3))}}}
  moved_settings = eval_progress.evaluation_settings(moved, backbone, more)
  again = eval_progress.EvaluationProgress(str(tmp_path), moved_settings,
                                           ("cflow", "uniad"), ["bottle", "cable"],
                                           ("original", "residual"), ("uniad",))
  assert again.resumed == 3 and again.done("cflow", "bottle", "original")
  assert not again.done("cflow", "bottle") and not again.done("cflow", "cable", "original")
  assert np.isnan(again.results["cflow"]["bottle"]["original"]["image_auroc"])
  # A run of one class: UniAD's numbers (fitted on two) are not kept; the rest is carried.
  subset = eval_progress.EvaluationProgress(str(tmp_path), moved_settings,
                                            ("uniad",), ["cable"], ("original",), ("uniad",))
  assert subset.resumed == 0 and subset.results == {"uniad": {}}
  subset.scored("uniad", "cable", "original", {"x": 0.1}, np.array([0.125]))
  subset.fitted("uniad")
  subset.finish()
  kept = eval_progress.read_partial(str(tmp_path), moved_settings)
  assert kept["results"] == {"cflow": {"bottle": {"original": {"image_auroc": kept["results"][
      "cflow"]["bottle"]["original"]["image_auroc"], "x": 0.5}}},
                             "uniad": {"cable": {"original": {"x": 0.1}}}}
  assert kept["scores"] == {"cflow": {"bottle": {"original": [0.25, 1.5]}},
                            "uniad": {"cable": {"original": [0.125]}}}
  assert kept["fitted_on"] == {"uniad": ["cable"]}
  assert set(kept["settings"]["projectors"]) == {"norm", "angle"}
  # A setting of a method the file holds no results of is no difference (GLASS here); one of
  # a method it holds results of is (CFLOW's via eval.best_over_test, below).
  glass_changed = configs.default_config()
  glass_changed.eval.method_settings = {"glass": {"epochs": 5, "texture_rounds": 2}}
  eval_progress.read_partial(str(tmp_path), eval_progress.evaluation_settings(
      glass_changed, backbone, projectors))
  glass_changed.eval.best_over_test = True
  with pytest.raises(ValueError, match=r"other settings: eval.best_over_test \(False there, "
                     r"True here\)\. Rerun"):
    eval_progress.read_partial(str(tmp_path), eval_progress.evaluation_settings(
        glass_changed, backbone, projectors))
  # Refused: a setting, the backbone's parameters, a shared projector's parameters.
  other = {"norm": {"l1_proj": {"w": np.arange(6.0).reshape(2, 3) + 1e-3}}}
  moved.eval.method_settings = {"cflow": {"epochs": 2}}
  with pytest.raises(ValueError, match=r"results.partial.json holds results of an interrupted "
                     r"evaluation with other settings: eval.method_settings.cflow.epochs "
                     r"\(unset there, 2 here\); the backbone's parameters \(another weights "
                     r"file\); the norm-selected projector \(other parameters\)"):
    eval_progress.read_partial(str(tmp_path), eval_progress.evaluation_settings(
        moved, {"stem": {"w": np.zeros((2, 2))}}, other))
  # Everything of the file in a finished run: the file goes.
  last = eval_progress.EvaluationProgress(str(tmp_path), moved_settings, ("cflow", "uniad"),
                                          ["bottle", "cable"], ("original",), ("uniad",))
  last.finish()
  assert not (tmp_path / "results.partial.json").exists()
  assert eval_progress.read_partial(str(tmp_path), settings) == {}


def test_method_settings_are_checked_and_typed_before_any_work(tmp_path, monkeypatch):
  """eval.method_settings, typed on the command line as text's best guess, take each setting's
  own type; an unknown method or setting, or a value of the wrong type, fails before the
  backbone's weights are read, naming the setting and the nearest name."""
  from adjax import configs
  from adjax.methods import checked_settings
  assert checked_settings("GLASS", {"projection": "off", "epochs": 100.0, "limit": None,
                                    "texture_annulus": "2,3", "lr": 1}, "s") == {
      "projection": False, "epochs": 100, "limit": None, "texture_annulus": (2.0, 3.0),
      "lr": 1.0}
  config = configs.default_config()
  config.eval.root, config.eval.features = str(tmp_path), ("original",)
  config.eval.methods = ("PatchCore", "glass")
  monkeypatch.setattr("adjax.evaluate.loop.build_backbone",
                      lambda *args, **kwargs: pytest.fail("the backbone was built"))
  for settings, message in (
      ({"glas": {"epochs": 2}}, r"eval.method_settings.glas: unknown method 'glas'; did you "
                                r"mean 'glass'\?"),
      ({"glass": {"epoch": 2}}, r"eval.method_settings.glass.epoch: glass has no such "
                                r"setting; did you mean 'epochs'\?"),
      ({"glass": {"projection": "maybe"}}, r"eval.method_settings.glass.projection: expected "
                                           r"a boolean"),
      ({"PatchCore": {"coreset_ratio": "most"}}, r"eval.method_settings.PatchCore."
                                                 r"coreset_ratio: expected a number")):
    config.eval.method_settings = settings
    with pytest.raises(ValueError, match=message):
      evaluate_lib.evaluate(config, None, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()   # nothing made for a run that could not start
  config.eval.method_settings = {}
  config.eval.features = ("original", "pretrained")
  with pytest.raises(ValueError, match=r"pretrained features need a run: pass --workdir RUN, "
                     r"or evaluate the backbone's own features alone with "
                     r"--config.eval.features=original,residual"):
    evaluate_lib.evaluate(config, None, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_glass_settings_of_their_old_place_are_refused_by_their_new_name(tmp_path):
  from adjax import configs
  from adjax.errors import UserError
  from adjax.evaluate import evaluate
  config = configs.default_config()
  config.eval.glass_textures = "/data/dtd/images"   # as a config.json from before the move has it
  config.eval.glass_texture_rounds = 4               # at its old default: not a difference
  config.eval.methods = ("glass",)
  with pytest.raises(UserError, match=r"^eval\.glass_textures moved to "
                     r"eval\.method_settings\.glass\.textures"):
    evaluate(config, None, str(tmp_path / "out"), progress=False)
