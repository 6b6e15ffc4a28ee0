"""Reference images from a precomputed bank, merged pretraining sets, and evaluation runs that
need no pretrained projector (apart from test_train.py, so that the two halves run in
parallel)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adjax.pretrain.step import StepSettings
from run_helpers import _eval_config, dataset, tiny_config  # noqa: F401 (a fixture)


# --------------------------------------------------------------------- precomputed references
def test_precomputed_reference_bank_equals_reference_images():
  from adjax.models.backbones import get_backbone
  from adjax.pretrain.derived import bank_slots
  from adjax.pretrain.step import batch_residuals
  backbone = get_backbone("tiny-vit", depth=2, taps=(1, 2))
  backbone_params = backbone.init(jax.random.PRNGKey(0))
  settings = StepSettings(level_strides=tuple(backbone.level_strides), num_heads=4,
                          compute_dtype=jnp.float32)
  rng = np.random.default_rng(0)
  shots, size = 3, 28
  # 2 groups of shots + 1 bank images (one spare, for an image that is itself in the bank).
  group_images = rng.integers(0, 256, (2, shots + 1, size, size, 3), dtype=np.uint8)
  bank_paths = np.array([[f"g{g}_{i}.png" for i in range(shots + 1)] for g in range(2)])
  bank_paths[0, 3] = "g0_0.png"    # a small group's bank repeats an image
  groups = np.array([1, 0, 1, 0], np.int32)
  # Image 0 is slot 1 of its group, image 2 slot 3, image 3 slots 0 and 3 (repeated); image 1
  # is not in the bank.
  own = bank_slots(["g1_1.png", "elsewhere.png", "g1_3.png", "g0_0.png"], groups, bank_paths)
  np.testing.assert_array_equal(own, [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 1]])
  ref_valid = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]], bool)
  # The group's first 3 slots but the image's own; image 3 has 2 others left: its third
  # reference (its own slot) is masked out.
  others = [[0, 2, 3], [0, 1, 2], [0, 1, 2], [1, 2, 0]]
  refs = np.stack([group_images[g][o] for g, o in zip(groups, others)])
  ref_valid_images = ref_valid.copy()
  ref_valid_images[3, 2] = False
  batch = {"view1": rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8),
           "view2": rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8),
           "refs": refs, "ref_valid": ref_valid, "ref_group": groups, "ref_self": own}
  frozen = {"backbone": backbone_params}
  from_images = batch_residuals(dict(batch, ref_valid=ref_valid_images), frozen, settings,
                                backbone.extract)
  bank = [np.asarray(lv).reshape(2, shots + 1, -1, lv.shape[-1]) for lv in backbone.extract(
      backbone_params, group_images.reshape(-1, size, size, 3) / np.float32(255))]
  from_bank = batch_residuals(batch, dict(frozen, ref_bank=bank), settings, backbone.extract)
  for view_a, view_b in zip(from_images, from_bank):
    for a, b in zip(view_a, view_b):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_pretraining_on_merged_datasets(dataset, tmp_path):
  from adjax.errors import UserError
  from adjax.pretrain.derived import load_references
  from adjax.pretrain import pretrain, pretrain_records
  eval_root = os.path.join(os.path.dirname(dataset), "eval")
  config = tiny_config(dataset)
  config.data.pretrain_format = "realiad,mvtec"
  config.data.pretrain_root = f"{dataset},{eval_root}"
  records = pretrain_records(config)
  alone = {fmt: pretrain_records(_with_format(root, fmt))
           for fmt, root in (("realiad", dataset), ("mvtec", eval_root))}
  assert sorted(records) == sorted(alone["realiad"] + alone["mvtec"])
  mvtec_class = alone["mvtec"][0].class_name
  config.data.pretrain_classes = f"mvtec/{mvtec_class},{alone['realiad'][0].class_name}"
  chosen = pretrain_records(config)
  assert {r.class_key for r in chosen} == {f"mvtec/{mvtec_class}",
                                           f"realiad/{alone['realiad'][0].class_name}"}
  config.data.pretrain_classes = "mvtec/nothing"
  with pytest.raises(UserError, match=r"names \['mvtec/nothing'\]"):
    pretrain_records(config)
  # "dataset/class" with one folder too.
  single = _with_format(eval_root, "mvtec")
  single.data.pretrain_classes = f"mvtec/{mvtec_class}"
  assert {r.class_key for r in pretrain_records(single)} == {f"mvtec/{mvtec_class}"}
  # Two folders of one format are two datasets, told apart by their place in the list.
  copy = shutil.copytree(eval_root, str(tmp_path / "eval_copy"))
  twice = _with_format(f"{eval_root},{copy}", "mvtec")
  keys = {r.class_key for r in pretrain_records(twice)}
  assert keys == {f"mvtec#1/{mvtec_class}", f"mvtec#2/{mvtec_class}"}
  # One folder named twice (here once with a trailing slash) would be read twice: refused.
  with pytest.raises(UserError, match="the same place twice"):
    pretrain_records(_with_format(f"{eval_root},{eval_root}/", "mvtec"))
  config.data.pretrain_classes = ""
  config.data.pretrain_format = "realiad,mvtec,visa"
  with pytest.raises(UserError, match="3 formats for 2 folders"):
    pretrain_records(config)
  # A short run on the merged set, its reference bank one group per (dataset, class, view).
  config.data.pretrain_format = "realiad,mvtec"
  config.train.precomputed_refs = True
  config.loss.center = False
  config.optim.max_steps = 2
  workdir = str(tmp_path / "merged")
  summary = pretrain(config, workdir, progress=False)
  assert summary["steps"] == 2 and np.isfinite(summary["last"]["loss"])
  assert summary["skipped"] == 0
  refs = load_references(workdir)
  assert len(refs["class_names"]) == 3 and f"mvtec/{mvtec_class}" in refs["class_names"]
  assert refs["view_names"] == ["", "C1", "C2"]     # MVTec AD has one view, Real-IAD's two
  groups = len(refs["class_names"]) * 3
  assert [lv.shape for lv in refs["levels"]] == [(groups, 3, 4, 4, 64)] * 4  # max_shots + 1
  # Every (dataset, class, view) that exists has its images; the others stay empty.
  filled = {(c, v) for c in refs["class_names"] for v in refs["view_names"]
            if (c.startswith("mvtec/")) == (v == "")}
  for g, (c, v) in enumerate((c, v) for c in refs["class_names"] for v in refs["view_names"]):
    assert all(refs["paths"][g]) == ((c, v) in filled), (c, v)


def _with_format(root, fmt):
  config = tiny_config(root)
  config.data.pretrain_format = fmt
  return config


def test_reference_groups_keep_datasets_apart(dataset, tmp_path):
  """Two merged datasets that share a class name (MVTec AD's and Real-IAD's "zipper") are two
  reference groups: in the loader's class ids and in the precomputed bank."""
  import dataclasses
  from adjax.pretrain.derived import _same_classes
  from adjax.from_config import build_backbone
  from adjax.pretrain import make_loader, pretrain_records, reference_bank
  config = tiny_config(dataset)
  records = pretrain_records(config)
  twin_class = records[0].class_name
  twins = [dataclasses.replace(r, dataset="visa") for r in records if r.class_name == twin_class]
  merged = sorted(records + twins)
  backbone, backbone_params = build_backbone(config)
  loader = make_loader(config, merged, backbone)
  assert len(loader.class_names) == 3
  assert f"visa/{twin_class}" in loader.class_names
  assert f"{records[0].dataset}/{twin_class}" in loader.class_names
  plan = loader.plan
  ids = {(r.dataset, plan.class_id(i)) for i, r in enumerate(plan.records)
         if r.class_name == twin_class}
  assert len(ids) == 2 and len({cid for _, cid in ids}) == 2
  bank = reference_bank(config, str(tmp_path), backbone=backbone,
                        backbone_params=backbone_params, records=merged)
  assert bank["class_names"] == list(loader.class_names)
  assert bank["levels"][0].shape[0] == 3 * len(loader.view_names)
  # A bank from before the names carried the dataset still fits a one-dataset run, not this.
  bare = [name.split("/", 1)[1] for name in loader.class_names]
  assert not _same_classes(bare, loader.class_names)
  single = make_loader(config, records, backbone).class_names
  assert _same_classes([name.split("/", 1)[1] for name in single], single)


def test_featurenorm_with_the_references_own_aligned_tables(dataset, tmp_path):
  # The reference's FeatureNorm evaluation gives each test image its own reference images
  # (aligned/references/<dataset>/<class>.json, paths of the authors' machine).
  from adjax.evaluate import evaluate
  from data_pipelines.index import read_dataset
  config = _eval_config(dataset, ("featurenorm",), ("original", "residual"))
  plain = evaluate(config, None, str(tmp_path / "plain"), progress=False)
  records = read_dataset("mvtec", config.eval.root)
  (class_name,) = plain["classes"]
  # The same file below the class folder, on the authors' machine.
  elsewhere = lambda r: (f"/data/authors/mvtec/{class_name}/"
                         + r.image_path.split(f"/{class_name}/")[1])
  train = [r for r in records if r.split == "train" and r.label == 0]
  table = {elsewhere(r): [elsewhere(t) for t in train[-2:]]
           for r in records if r.split == "test"}
  tables = tmp_path / "aligned"
  tables.mkdir()
  (tables / f"{class_name}.json").write_text(json.dumps(table))
  config.eval.aligned_references = str(tables)
  aligned = evaluate(config, None, str(tmp_path / "aligned_out"), progress=False)
  got, want = (r["results"]["featurenorm"][class_name] for r in (aligned, plain))
  assert got["original"] == want["original"]        # the raw features take no references
  assert got["residual"] != want["residual"]        # other references: other residuals
  assert 0.0 <= got["residual"]["image_auroc"] <= 1.0


def test_glass_learns_from_texture_images(dataset, tmp_path, monkeypatch, caplog):
  """With eval.method_settings.glass.textures, GLASS's texture anomalies are real images
  (texture photographs blended into the training images), featurised as the kind evaluated."""
  from PIL import Image
  from skimage import data as skdata
  from adjax.evaluate import FeatureMaker, evaluate
  from adjax.methods.glass import Glass
  textures = tmp_path / "dtd" / "images" / "misc"
  textures.mkdir(parents=True)
  for name in ("brick", "gravel"):
    Image.fromarray(getattr(skdata, name)()).convert("RGB").save(textures / f"{name}.jpg")
  fits, backbone_calls = [], []
  fit, levels_of = Glass.fit, FeatureMaker.backbone_levels
  monkeypatch.setattr(Glass, "fit", lambda self, train, rng, **kw: fits.append(
      (self, train, kw)) or fit(self, train, rng, **kw))
  monkeypatch.setattr(FeatureMaker, "backbone_levels", lambda self, images: backbone_calls.append(
      len(images)) or levels_of(self, images))
  config = _eval_config(dataset, ("glass",), ("original", "residual"))
  config.eval.method_settings = {"glass": {"embed_dim": 16, "target_dim": 16, "hidden": 16,
                                           "epochs": 2, "batch_size": 4, "ascent_steps": 2,
                                           "textures": str(tmp_path / "dtd"),
                                           "texture_rounds": 2}}
  summary = evaluate(config, None, str(tmp_path / "out"), progress=False)
  (class_name,) = summary["classes"]
  for kind in ("original", "residual"):
    assert 0.0 <= summary["results"]["glass"][class_name][kind]["image_auroc"] <= 1.0
  train_images = backbone_calls[0]
  assert sum(backbone_calls[2:]) == 2 * train_images   # the copies, in chunks
  (original, train_o, kw_o), (residual, train_r, kw_r) = fits
  syn_o, syn_r = kw_o["synthetic_levels"], kw_r["synthetic_levels"]
  # GLASS's levels only (the last 2), of every texture copy.
  assert len(syn_o) == 2 and len(train_o) == 4
  for syn_level, train_level in zip(syn_o, train_o[-2:]):
    assert syn_level.shape == (2 * train_images,) + train_level.shape[1:]
  assert kw_o["synthetic_masks"].shape == (2 * train_images,) + original.token_grid(train_o)
  assert np.all(kw_o["synthetic_masks"].max(axis=(1, 2)) == 1)
  np.testing.assert_array_equal(kw_o["synthetic_masks"], kw_r["synthetic_masks"])
  # The residual kind's anomalies are residuals too (against the same references), and the
  # residual kind runs GLASS as the reference does (no projection).
  assert not np.allclose(np.asarray(syn_o[-1]), np.asarray(syn_r[-1]))
  assert original.projection and not residual.projection
  # texture_refresh: a new set of copies every `rounds` epochs, made when GLASS's
  # training reaches it (here epoch 2 of 3), seeded anew, featurised as the kind's.
  from data_pipelines import texture_anomalies
  made, synthesize = [], texture_anomalies.synthesize
  monkeypatch.setattr(texture_anomalies, "synthesize", lambda *a, **kw: made.append(
      synthesize(*a, **kw)) or made[-1])
  fits.clear()
  backbone_calls.clear()
  config.eval.features = ("residual",)
  config.eval.method_settings["glass"]["texture_refresh"] = True
  config.eval.method_settings["glass"]["epochs"] = 3
  refreshed = evaluate(config, None, str(tmp_path / "refreshed"), progress=False)
  assert 0.0 <= refreshed["results"]["glass"][class_name]["residual"]["image_auroc"] <= 1.0
  assert len(made) == 2 and sum(backbone_calls[2:]) == 2 * 2 * train_images
  np.testing.assert_array_equal(made[0][1], kw_r["synthetic_masks"])   # set 0 as before
  assert not np.array_equal(made[1][0], made[0][0])
  assert not np.array_equal(made[1][1], made[0][1])
  ((_, _, kw),) = fits
  fresh, fresh_masks = kw["synthetic_refresh"](1)   # the same set 1 again: seeded by its index
  np.testing.assert_array_equal(fresh_masks, made[1][1])
  assert [x.shape for x in fresh] == [x.shape for x in kw["synthetic_levels"]]
  assert not np.allclose(fresh[-1], kw["synthetic_levels"][-1])
  # A texture folder that is not there fails before any work, naming the setting.
  config.eval.method_settings["glass"]["textures"] = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match=r"eval\.method_settings\.glass\.textures"):
    evaluate(config, None, str(tmp_path / "out2"), progress=False)
  # Without a texture folder the refresh and the foreground masks have nothing to act on:
  # both warned, GLASS trains on its feature-space stand-in.
  config.eval.method_settings["glass"]["textures"] = ""
  config.eval.method_settings["glass"]["foreground"] = str(tmp_path)
  fits.clear()
  with caplog.at_level("WARNING", logger="adjax"):
    evaluate(config, None, str(tmp_path / "out3"), progress=False)
  glass = "eval.method_settings.glass"
  assert f"{glass}.texture_refresh is set but {glass}.textures is not" in caplog.text
  assert f"{glass}.foreground is set but {glass}.textures is not" in caplog.text
  ((_, _, kw),) = fits
  assert kw == {}


def test_an_interrupted_evaluation_is_continued(dataset, tmp_path, monkeypatch):
  """A rerun into the folder of an evaluation that stopped part-way keeps what was scored (each
  method, class and kind on its own; UniAD, one model for the dataset, only for the classes it
  was fitted on) and scores the rest, giving the uninterrupted run's results; a rerun of fewer
  classes leaves the others' results in the file; other settings are refused, naming the file
  and each difference."""
  from adjax.evaluate import loop as evaluate_lib
  from adjax.evaluate.progress import PARTIAL_NAME
  methods, kinds = ("featurenorm", "patchcore", "uniad"), ("original", "residual")
  # Two classes: the embedded evaluation class and a copy of it under another name.
  source = os.path.join(os.path.dirname(dataset), "eval")
  (first_class,) = os.listdir(source)
  root = tmp_path / "eval"
  for name in (first_class, first_class + "_twin"):
    shutil.copytree(os.path.join(source, first_class), root / name)
  classes = sorted(os.listdir(root))

  def make_config(tsne=True):
    # Method names in any case (as get_method takes them): results are keyed in lower case.
    config = _eval_config(dataset, ("featurenorm", "PatchCore", "UniAD"), kinds, tsne=tsne)
    config.eval.root = str(root)
    config.eval.method_settings = {"uniad": {"epochs": 1, "hidden_dim": 16, "ffn_dim": 16,
                                             "neighbour_size": 3, "encoder_layers": 1,
                                             "decoder_layers": 1, "num_heads": 2}}
    return config

  whole = evaluate_lib.evaluate(make_config(tsne=False), None, str(tmp_path / "whole"),
                                progress=False)
  config = make_config()
  assert whole["classes"] == classes and set(whole["results"]) == set(methods)
  scored, fail_at = [], {}
  score_method = evaluate_lib.score_method

  def interrupted(name, settings, *args, **kwargs):
    scored.append(name)
    if fail_at.get(name) == scored.count(name):
      raise RuntimeError("preempted")
    return score_method(name, settings, *args, **kwargs)

  monkeypatch.setattr(evaluate_lib, "score_method", interrupted)
  out = tmp_path / "out"

  def partial():
    with open(out / PARTIAL_NAME) as f:
      return json.load(f)

  def run(config, **fail):
    scored.clear()
    fail_at.clear()
    fail_at.update(fail)
    return evaluate_lib.evaluate(config, None, str(out), progress=False)

  # Stopped at PatchCore's first kind of the second class.
  with pytest.raises(RuntimeError, match="preempted"):
    run(config, patchcore=3)
  first = partial()
  assert {c: set(k) for c, k in first["results"]["featurenorm"].items()} == {
      c: set(kinds) for c in classes}
  assert list(first["results"]["patchcore"]) == classes[:1] and "uniad" not in first["results"]
  assert first["classes_done"] == [] and first["tsne"] == classes[0]
  # Other settings: refused before any class, each difference named.
  changed = make_config()
  changed.eval.shots, changed.seed = 3, 1
  with pytest.raises(ValueError, match=rf"{PARTIAL_NAME} holds results of an interrupted "
                     r"evaluation with other settings: eval.shots \(2 there, 3 here\); "
                     r"seed \(0 there, 1 here\)"):
    run(changed)
  # The same settings (and a batch size: the backbone's batching changes numbers by float
  # rounding only): continued, the first class's scores kept, its plot not made again.
  config.eval.batch_size = 3
  with pytest.raises(RuntimeError, match="preempted"):
    run(config, uniad=1)
  assert scored == ["patchcore", "patchcore", "uniad"]
  assert set(partial()["results"]["patchcore"]) == set(classes)
  assert partial()["classes_done"] == [] and partial()["tsne"] == classes[0]
  assert [p.name for p in out.glob("tsne_*.png")] == [f"tsne_{classes[0]}.png"]
  # One class only: UniAD is fitted on it alone; the other class's results stay in the file.
  config.eval.classes = classes[0]
  alone = run(config)
  assert scored == ["uniad", "uniad"] and alone["classes"] == classes[:1]
  assert partial()["fitted_on"] == {"uniad": classes[:1]}
  assert set(partial()["results"]["featurenorm"]) == set(classes)
  # Both classes again: UniAD (fitted on one) is redone; the rest was scored.
  config.eval.classes = ""
  resumed = run(config)
  assert scored == ["uniad"] * 4
  assert not (out / PARTIAL_NAME).exists()
  for method in methods:
    for class_name in classes:
      for kind in kinds:
        got, want = (r["results"][method][class_name][kind] for r in (resumed, whole))
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-4)
  # Every image's score in the CSVs, those kept from the interrupted runs included.
  for method in methods:
    for kind in kinds:
      got, want = ((out / f"scores_{method}_{kind}.csv").read_text().splitlines(),
                   (tmp_path / "whole" / f"scores_{method}_{kind}.csv").read_text().splitlines())
      assert got[0] == want[0] == "path,label,score" and len(got) == len(want) > 2
      assert [line.rsplit(",", 1)[0] for line in got] == [w.rsplit(",", 1)[0] for w in want]
      np.testing.assert_allclose([float(g.rsplit(",", 1)[1]) for g in got[1:]],
                                 [float(w.rsplit(",", 1)[1]) for w in want[1:]], rtol=1e-4)
  # A partial file written by an older adjax (no settings) is not mixed in either.
  with open(out / PARTIAL_NAME, "w") as f:
    json.dump({"results": first["results"], "classes_done": []}, f)
  with pytest.raises(ValueError, match="without the settings that made them"):
    run(config)
