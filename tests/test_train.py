"""Pretraining: loss goes down, exact resume after SIGKILL, SIGTERM, non-finite steps skipped
and counted, precomputed references, checkpoint selection and evaluation. Device-count
independence is in test_train_devices.py."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adjax import run_layout
from adjax.configs import default_config
from adjax.models.projector import init_projector
from adjax.optim import make_optimizer
from adjax.train_step import StepSettings, apply_gradients, init_train_state, residual_update

HERE = pathlib.Path(__file__).parent
REPO = HERE.parent


def _flat(params):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


# --------------------------------------------------------------------- non-finite steps
def test_non_finite_step_is_skipped_and_counted():
  settings = StepSettings(level_strides=(14,), num_heads=2, compute_dtype=jnp.float32)
  optimizer = make_optimizer(1e-3, 5e-4, steps_per_epoch=10)
  params = init_projector(jax.random.PRNGKey(0), [8], num_heads=2, num_ref_tokens=16)
  state = init_train_state(params, optimizer, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  res = [jnp.asarray(rng.normal(size=(2, 2, 2, 8)).astype(np.float32))]
  masks = np.zeros((2, 28, 28), np.float32)
  masks[0, :14, :14] = 1
  update = jax.jit(lambda s, a, b: residual_update(s, a, b, masks, None, settings, optimizer))
  state, metrics = update(state, res, [r + 0.1 for r in res])
  assert int(state["skipped"]) == 0 and float(metrics["finite"]) == 1.0
  before = _flat(state["params"])
  bad = [res[0].at[0, 0, 0, 0].set(jnp.nan)]
  state, metrics = update(state, bad, res)
  assert not np.isfinite(float(metrics["loss"]))
  assert int(state["skipped"]) == 1 and int(state["step"]) == 2
  after = _flat(state["params"])
  for key in before:
    np.testing.assert_array_equal(before[key], after[key])
  state, _ = update(state, res, [r + 0.1 for r in res])   # training goes on afterwards
  assert int(state["skipped"]) == 1
  assert any(np.abs(after[k] - v).max() > 0 for k, v in _flat(state["params"]).items())


def test_skipped_steps_do_not_delay_the_learning_rate_decay():
  # 2 steps per epoch, lr x 0.1 after epoch 1: steps 0-1 at lr, 2+ at lr / 10, counted in
  # batches seen whether or not their update was applied.
  optimizer = make_optimizer(1.0, 0.0, steps_per_epoch=2, decay_epochs=(1,))
  params = {"w": jnp.zeros((3,))}
  grads = {"w": jnp.ones((3,))}
  step = jax.jit(lambda s, loss: apply_gradients(s, optimizer, loss, grads)[0])
  def update_sizes(losses):
    state = init_train_state(params, optimizer, jax.random.PRNGKey(0))
    sizes = []
    for loss in losses:
      new = step(state, jnp.float32(loss))
      sizes.append(float(jnp.abs(new["params"]["w"] - state["params"]["w"]).max()))
      state = new
    return np.round(sizes, 4).tolist()
  assert update_sizes([1, 1, 1, 1]) == [1.0, 1.0, 0.1, 0.1]
  assert update_sizes([np.nan, 1, 1, 1]) == [0.0, 1.0, 0.1, 0.1]
  assert update_sizes([1, np.nan, np.nan, 1]) == [1.0, 0.0, 0.0, 0.1]


def test_inf_gradient_with_finite_loss_is_skipped():
  optimizer = make_optimizer(1e-3, 5e-4, steps_per_epoch=10)
  params = init_projector(jax.random.PRNGKey(0), [8], num_heads=2, num_ref_tokens=16)
  state = init_train_state(params, optimizer, jax.random.PRNGKey(1))
  grads = jax.tree.map(jnp.ones_like, params)
  grads["l1_proj"]["x_ref"] = grads["l1_proj"]["x_ref"].at[3, 2].set(jnp.inf)
  new_state, finite, norm = jax.jit(
      lambda s, g: apply_gradients(s, optimizer, jnp.float32(1.0), g))(state, grads)
  assert not bool(finite) and not np.isfinite(float(norm))
  assert int(new_state["skipped"]) == 1 and int(new_state["step"]) == 1
  for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    if old.shape:   # parameters and optimiser moments untouched
      np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
  grads["l1_proj"]["x_ref"] = jnp.ones_like(params["l1_proj"]["x_ref"])
  new_state, finite, norm = apply_gradients(state, optimizer, jnp.float32(1.0), grads)
  assert bool(finite) and int(new_state["skipped"]) == 0
  count = sum(x.size for x in jax.tree.leaves(params))
  np.testing.assert_allclose(float(norm), np.sqrt(count), rtol=1e-5)
  assert np.abs(np.asarray(new_state["params"]["l1_proj"]["x_ref"])
                - np.asarray(params["l1_proj"]["x_ref"])).max() > 0


# --------------------------------------------------------------------- full runs
def tiny_config(data_root: str, with_validation: bool = False):
  c = default_config()
  if with_validation:  # select checkpoints on the held-out classes at the end of each epoch
    c.data.val_format = "mvtec"
    c.data.val_root = os.path.join(os.path.dirname(data_root), "eval")
    c.train.eval_every_epochs = 1
    c.eval.shots = 2
  c.backbone.name = "tiny-vit"
  c.image_size = 56
  c.data.pretrain_root = data_root
  c.data.batch_size = 4
  c.data.shots = (1, 2)
  c.data.max_shots = 2
  c.projector.num_heads = 4
  c.projector.num_ref_tokens = 32
  c.optim.lr = 1e-3
  c.optim.max_steps = 6
  c.train.dtype = "float32"
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.center_shots = 2
  c.train.center_images_per_group = 2
  c.loss.angle_block_size = 64
  return c


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  from data_pipelines.embedded import generate_embedded_dataset
  root = tmp_path_factory.mktemp("embedded")
  summary = generate_embedded_dataset(str(root), image_size=56, pretrain_classes=2,
                                      eval_classes=1, images_per_class=12)
  return summary["pretrain_root"]


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
  from adjax.train import pretrain
  workdir = str(tmp_path_factory.mktemp("run_a"))
  summary = pretrain(tiny_config(dataset, with_validation=True), workdir, progress=False)
  return workdir, summary


def _metrics(workdir):
  rows = [json.loads(line) for line in open(run_layout.metrics_path(workdir))]
  return {row["step"]: row for row in rows if "loss" in row}


def test_pretraining_lowers_the_loss(dataset, uninterrupted):
  from adjax.train import build_backbone, final_params, load_centers, make_loader, \
      pretrain_records, step_settings
  from adjax.train_step import batch_loss
  workdir, summary = uninterrupted
  assert summary["steps"] == 6 and summary["skipped"] == 0
  config = tiny_config(dataset)
  backbone, backbone_params = build_backbone(config)
  loader = make_loader(config, pretrain_records(config), backbone)
  frozen = {"backbone": backbone_params,
            "centers": [jnp.asarray(c) for c in load_centers(workdir)]}
  settings = step_settings(config, backbone)
  loss = jax.jit(lambda p, b: batch_loss(p, b, frozen, settings, backbone.extract)[0])
  initial = init_projector(jax.random.PRNGKey(config.seed), backbone.level_dims,
                           num_heads=4, num_ref_tokens=32)
  trained = final_params(workdir)
  keys = ("view1", "view2", "masks", "refs", "ref_valid")
  batches = [{k: loader.batch_at(s)[k] for k in keys} for s in (0, 7)]
  before = np.mean([float(loss(initial, b)) for b in batches])
  after = np.mean([float(loss(trained, b)) for b in batches])
  assert after < 0.9 * before, (before, after)
  # Centres exist, one per level, with the level's width.
  assert [c.shape for c in load_centers(workdir)] == [(64,)] * 4
  # Both selections were written by the validation evaluator (PatchCore -> angle, FeatureNorm
  # -> norm) with their scores, and the metrics log has the validation scores.
  val = [row for row in map(json.loads, open(run_layout.metrics_path(workdir)))
         if "val/angle" in row]
  assert [row["step"] for row in val] == [6]
  for kind in run_layout.KINDS:
    params, meta = run_layout.load_best(workdir, kind)
    assert meta["step"] == 6 and 0.0 <= meta["score"] <= 1.0
    assert meta["score"] == pytest.approx(val[0][f"val/{kind}"])


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from adjax import checkpointing
    from adjax.train import pretrain
    from test_train import tiny_config
    original = checkpointing.RunCheckpointer.save
    def save_then_die(self, step, *args, **kwargs):
      original(self, step, *args, **kwargs)
      if step == {kill_at}:
        self.wait()                      # the step-{kill_at} checkpoint is complete on disk
        os.kill(os.getpid(), signal.SIGKILL)
    checkpointing.RunCheckpointer.save = save_then_die
    pretrain(tiny_config({data!r}, with_validation=True), {workdir!r}, progress=False)
""")


def test_resume_after_sigkill_is_exact(dataset, uninterrupted, tmp_path):
  from adjax.train import final_params, pretrain
  reference_dir, _ = uninterrupted
  workdir = str(tmp_path / "run_b")
  script = _KILLED_RUN.format(repo=str(REPO), tests=str(HERE), kill_at=4, data=dataset,
                              workdir=workdir)
  proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ),
                        capture_output=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
  steps_on_disk = sorted(int(p) for p in os.listdir(run_layout.checkpoints_dir(workdir))
                         if p.isdigit())
  assert steps_on_disk[-1] == 4
  summary = pretrain(tiny_config(dataset, with_validation=True), workdir, progress=False)
  assert summary["steps"] == 6
  want, got = _flat(final_params(reference_dir)), _flat(final_params(workdir))
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # The resumed run saw the same batches: every step's loss equals the uninterrupted run's.
  reference, resumed = _metrics(reference_dir), _metrics(workdir)
  assert sorted(resumed) == list(range(1, 7))
  for step in (5, 6):
    assert resumed[step]["loss"] == reference[step]["loss"], step


def test_sigterm_saves_and_exits_cleanly(dataset, tmp_path):
  workdir = str(tmp_path / "run_c")
  script = textwrap.dedent(f"""
      import os, signal, sys
      sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(HERE)!r})
      from adjax import train_step
      from adjax.train import pretrain
      from test_train import tiny_config
      original = train_step.residual_update
      calls = []
      def update_then_term(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # traced once; the signal arrives during the first step
          os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
      train_step.residual_update = update_then_term
      config = tiny_config({dataset!r}); config.optim.max_steps = 50
      config.train.checkpoint_every = 1000
      summary = pretrain(config, "run_c", progress=False)  # relative, as users type it
      print("PREEMPTED", summary["preempted"], summary["steps"])
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=600,
                        cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr.decode()[-3000:]
  assert b"PREEMPTED True 1" in proc.stdout
  steps = [int(p) for p in os.listdir(run_layout.checkpoints_dir(workdir)) if p.isdigit()]
  assert steps == [1]


def test_centres_follow_what_the_projector_sees(dataset, tmp_path):
  # Residuals by default; raw features in the residual-off ablation (mean over the same
  # normal images, computed here independently of compute_centers' arithmetic).
  from adjax.train import build_backbone, compute_centers, pretrain_records
  from data_pipelines.images import load_record
  config = tiny_config(dataset)
  config.train.center_shots = 1
  config.train.center_images_per_group = 1000   # every other normal image of the group
  backbone, backbone_params = build_backbone(config)
  records = pretrain_records(config)
  residual = compute_centers(config, str(tmp_path / "a"), backbone=backbone,
                             backbone_params=backbone_params, records=records)
  config.loss.residual = False
  raw = compute_centers(config, str(tmp_path / "b"), backbone=backbone,
                        backbone_params=backbone_params, records=records)
  groups = {}
  for r in records:
    if r.label == 0:
      groups.setdefault((r.dataset, r.class_name, r.view), []).append(r)
  rng = np.random.default_rng(config.seed)
  features = []
  for key in sorted(groups):
    members = groups[key]
    queries = [members[i] for i in rng.permutation(len(members))[1:]]
    images = np.stack([load_record(r, config.image_size)[0] for r in queries]) / np.float32(255)
    features.append(backbone.extract(backbone_params, images, jnp.float32))
  for k, centre in enumerate(raw):
    tokens = np.concatenate([np.asarray(f[k]).reshape(-1, centre.shape[0]) for f in features])
    np.testing.assert_allclose(centre, tokens.mean(0), rtol=1e-4, atol=1e-5)
    assert np.abs(centre - residual[k]).max() > 1e-2


# --------------------------------------------------------------------- reusing a workdir
def test_a_workdir_refuses_settings_that_make_another_run(dataset, uninterrupted, tmp_path):
  import shutil
  from adjax.errors import UserError
  from adjax.train import _check_run_settings, pretrain
  workdir = str(tmp_path / "run")
  shutil.copytree(uninterrupted[0], workdir)   # a finished run: config.json and checkpoints
  stored = open(run_layout.config_path(workdir)).read()
  config = tiny_config(dataset)
  config.optim.lr = 0.5
  config.data.max_shots = 3
  with pytest.raises(UserError, match=r"other settings: data.max_shots \(2 there, 3 here\); "
                                      r"optim.lr \(0.001 there, 0.5 here\)"):
    pretrain(config, workdir, progress=False)
  assert open(run_layout.config_path(workdir)).read() == stored   # left as it was
  # Paths, length, logging and evaluation may change when a run resumes.
  config = tiny_config(dataset)
  config.optim.max_steps = 12
  config.data.pretrain_root = "/elsewhere/data"
  config.train.checkpoint_every = 5
  config.eval.shots = 4
  _check_run_settings(config, workdir)
  config.train.checkpoint_every = 0
  with pytest.raises(UserError, match="config.train.checkpoint_every must be an integer >= 1"):
    _check_run_settings(config, workdir)
  config.train.checkpoint_every = 2
  assert _check_run_settings(config, workdir) is False
  # A path may move, but adding a dataset to the pretraining set makes another run.
  config.data.pretrain_root = f"/elsewhere/data,{dataset}"
  with pytest.raises(UserError, match=r"data.pretrain_root \(1 datasets there, 2 here"):
    _check_run_settings(config, workdir)
  config.data.pretrain_root = dataset
  # The demo's own switches (adjax demo --config.demo.fresh=False resumes) may change too.
  demo_run = str(tmp_path / "demo")
  run_layout.save_config(demo_run, {"demo": {"fresh": True}, "optim": {"lr": 1e-4}})
  assert run_layout.config_changes(demo_run, {"demo": {"fresh": False},
                                              "optim": {"lr": 1e-4}}) == []
  assert run_layout.config_changes(demo_run, {"demo": {"fresh": False}, "optim": {"lr": 1.0}}
                                   ) == ["optim.lr (0.0001 there, 1.0 here)"]
  open(tmp_path / "a_file", "w").close()
  with pytest.raises(UserError, match="is a file, not a run folder"):
    _check_run_settings(tiny_config(dataset), str(tmp_path / "a_file"))
  # An attempt that failed before its first checkpoint (e.g. out of memory) has nothing to
  # resume: other settings start afresh, and its centres and reference bank are recomputed.
  attempt = str(tmp_path / "attempt")
  os.makedirs(os.path.join(attempt, "checkpoints"))   # orbax makes the folder up front
  shutil.copy(run_layout.config_path(uninterrupted[0]), attempt)
  config = tiny_config(dataset)
  config.data.batch_size = 2
  assert _check_run_settings(config, attempt) is True
  assert _check_run_settings(tiny_config(dataset), attempt) is False


def test_metrics_log_drops_steps_a_resume_repeats_and_writes_nan_as_null(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  for step in range(1, 6):
    run_layout.append_jsonl(path, {"step": step, "loss": float(step)})
  run_layout.append_jsonl(path, {"step": 6, "loss": float("nan"), "x": np.float32("inf")})
  with open(path, "a") as f:
    f.write('{"step": 7, "lo')     # torn by a kill
  rows = [json.loads(line) for line in open(path) if line.endswith("\n")]
  assert rows[-1] == {"step": 6, "loss": None, "x": None}
  run_layout.truncate_jsonl(path, 3)
  assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3]
  # Results files too (a class with one test label has NaN image metrics).
  results = str(tmp_path / "results.json")
  run_layout.write_json(results, {"a": {"auroc": float("nan"), "ap": np.float32(0.5)},
                                  "b": [np.float64("inf"), 1.0], "c": np.array([np.nan, 2.0])})
  text = open(results).read()
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"a": {"auroc": None, "ap": 0.5}, "b": [None, 1.0],
                              "c": [None, 2.0]}


def test_final_selection_is_replaced_when_a_finished_run_is_extended(tmp_path):
  # (pretrain rewrites it only when it trained: a rerun of a finished run keeps it.)
  from adjax.train import _BestTracker
  workdir = str(tmp_path / "run")
  params = {"w": np.zeros(2, np.float32)}
  for kind in run_layout.KINDS:
    run_layout.save_best(workdir, kind, params, {"step": 6, "selected_by": "final"})
  assert not _BestTracker(workdir).evaluated        # the extended run's end replaces them
  run_layout.save_best(workdir, "angle", params, {"step": 6, "score": 0.7})
  tracker = _BestTracker(workdir)
  assert tracker.evaluated and tracker.best == {"angle": 0.7}


# --------------------------------------------------------------------- precomputed references
def test_precomputed_reference_bank_equals_reference_images():
  from adjax.models.backbones import get_backbone
  from adjax.train import bank_slots
  from adjax.train_step import batch_residuals
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
  from adjax.train import load_references, pretrain, pretrain_records
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
  twice = _with_format(f"{eval_root},{eval_root}", "mvtec")
  keys = {r.class_key for r in pretrain_records(twice)}
  assert keys == {f"mvtec#1/{mvtec_class}", f"mvtec#2/{mvtec_class}"}
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
  from adjax.train import _same_classes, build_backbone, make_loader, pretrain_records, \
      reference_bank
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


# --------------------------------------------------------------------- evaluation
def _eval_config(dataset, methods, features, tsne=False):
  """tiny_config evaluating `methods` on `features` of the embedded set's held-out class."""
  config = tiny_config(dataset)
  config.eval.format = "mvtec"
  config.eval.root = os.path.join(os.path.dirname(dataset), "eval")
  config.eval.methods = methods
  config.eval.features = features
  config.eval.shots = 2
  config.eval.tsne = tsne
  return config


def test_evaluate_compares_feature_kinds(dataset, uninterrupted, tmp_path, monkeypatch):
  from adjax.evaluate import FeatureMaker, evaluate
  workdir, _ = uninterrupted
  # UniAD (one model for the dataset) must not cost a second backbone pass over the data.
  backbone_calls = []
  original = FeatureMaker.backbone_levels
  monkeypatch.setattr(FeatureMaker, "backbone_levels",
                      lambda self, images: backbone_calls.append(len(images))
                      or original(self, images))
  config = _eval_config(dataset, ("featurenorm", "patchcore", "uniad"),
                        ("original", "residual", "pretrained"), tsne=True)
  config.eval.method_settings = {"uniad": {"epochs": 2, "hidden_dim": 32, "ffn_dim": 64,
                                           "neighbour_size": 3,   # the grid is 4 x 4
                                           "encoder_layers": 1, "decoder_layers": 1,
                                           "num_heads": 2}}
  out = tmp_path / "eval"
  summary = evaluate(config, workdir, str(out), progress=False)
  results = summary["results"]
  assert set(results) == {"featurenorm", "patchcore", "uniad"}
  (class_name,) = summary["classes"]
  assert len(backbone_calls) == 2   # the class's training and test images, once each
  for method, per_class in results.items():
    for kind in ("original", "residual", "pretrained"):
      metrics = per_class[class_name][kind]
      for name in ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= metrics[name] <= 1.0, (method, kind, name)
  # The tables put original and pretrained side by side with their difference.
  table = json.loads((out / "results_patchcore.json").read_text())
  row = table[class_name]["image_auroc"]
  assert row["difference"] == pytest.approx(row["pretrained"] - row["original"])
  assert row["original"] == pytest.approx(results["patchcore"][class_name]["original"][
      "image_auroc"])
  assert (out / "results_patchcore.md").read_text().count("|") > 10
  assert list(out.glob("tsne_*.png")) and list((out / "heatmaps").rglob("*.png"))
  # FeatureNorm on original features is a property of the backbone, not of the projector;
  # on the same data, the residual kind must differ from it (the residual really is applied).
  fn = results["featurenorm"][class_name]
  assert fn["original"] != fn["residual"]


def test_featurenorm_with_the_references_own_aligned_tables(dataset, tmp_path):
  # The reference's FeatureNorm evaluation gives each test image its own reference images
  # (aligned/references/<dataset>/<class>.json, paths of the authors' machine).
  from adjax.evaluate import evaluate
  from data_pipelines.records import read_dataset
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


def test_glass_learns_from_texture_images(dataset, tmp_path, monkeypatch):
  """With eval.glass_textures, GLASS's texture anomalies are real images (texture photographs
  blended into the training images), featurised as the kind being evaluated."""
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
  config.eval.glass_textures = str(tmp_path / "dtd")
  config.eval.glass_texture_rounds = 2
  config.eval.method_settings = {"glass": {"embed_dim": 16, "target_dim": 16, "hidden": 16,
                                           "epochs": 2, "batch_size": 4, "ascent_steps": 2}}
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
  # A texture folder that is not there fails before any work, naming the setting.
  config.eval.glass_textures = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="eval.glass_textures"):
    evaluate(config, None, str(tmp_path / "out2"), progress=False)
