"""Pretraining: loss goes down, exact resume after SIGKILL, SIGTERM, non-finite steps skipped
and counted, workdir settings, checkpoint selection and evaluation with a pretrained projector.
Precomputed references, merged sets and projector-free evaluation runs are in
test_references_and_evaluation.py; device-count independence in test_train_devices.py."""

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

from adjax.io import files
from adjax import run_layout
from adjax.evaluate.selection import selection_evaluator
from adjax.models.projector import init_projector
from adjax.optim import make_optimizer
from adjax.pretrain.step import StepSettings, apply_gradients, init_train_state, residual_update
from run_helpers import _eval_config, dataset, tiny_config  # noqa: F401 (a fixture)

HERE = pathlib.Path(__file__).parent
SUPPORT = HERE.parent / "support"
REPO = HERE.parents[1]


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


def test_bfloat16_step_matches_float32_step():
  # The recipe's compute dtype: the projector's linear layers (adjax.models.matmul's own VJP),
  # its attention (the native kernel's AMX or float32 handlers, 16-wide heads) and the MLP
  # middle take their bfloat16 paths; the loss and the gradients of the whole step stay within
  # bfloat16 accuracy of the float32 step's, and the update is applied.
  from adjax.pretrain.step import pretraining_loss
  params = init_projector(jax.random.PRNGKey(0), [64, 32], num_heads=4, num_ref_tokens=48)
  rng = np.random.default_rng(3)
  res1 = [jnp.asarray(rng.normal(size=(2, 4, 4, c)).astype(np.float32)) for c in (64, 32)]
  res2 = [r + 0.1 for r in res1]
  masks = np.zeros((2, 56, 56), np.float32)
  masks[0, :28, :28] = 1
  results = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    settings = StepSettings(level_strides=(14, 14), num_heads=4, compute_dtype=dtype)
    results[dtype] = jax.jit(jax.value_and_grad(
        lambda p: pretraining_loss(p, res1, res2, masks, None, settings)[0]))(params)
  (loss32, grads32), (loss16, grads16) = results[jnp.float32], results[jnp.bfloat16]
  assert abs(float(loss16) - float(loss32)) < 0.02 * abs(float(loss32))
  flat32, flat16 = _flat(grads32), _flat(grads16)
  for key, g in flat32.items():
    if "['key']['bias']" in key:
      continue   # exactly zero in both (see _Linear.zero_bias_gradient)
    scale = np.abs(g).max()
    np.testing.assert_allclose(flat16[key], g, atol=0.03 * scale, err_msg=key)   # seen: 1 %
  settings = StepSettings(level_strides=(14, 14), num_heads=4, compute_dtype=jnp.bfloat16)
  optimizer = make_optimizer(1e-3, 5e-4, steps_per_epoch=10)
  state = init_train_state(params, optimizer, jax.random.PRNGKey(1))
  state, metrics = jax.jit(lambda s: residual_update(s, res1, res2, masks, None, settings,
                                                     optimizer))(state)
  assert float(metrics["finite"]) == 1.0 and int(state["skipped"]) == 0


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


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("lr", [1e39, np.nan])   # overflows float32; NaN (past validation)
def test_update_that_would_make_params_non_finite_is_skipped(lr):
  # Finite loss and gradients, but the candidate parameters are not finite: the old state is
  # kept (parameters and Adam's moments), the step is counted as skipped, training goes on.
  optimizer = make_optimizer(lr, 5e-4, steps_per_epoch=10)
  params = init_projector(jax.random.PRNGKey(0), [8], num_heads=2, num_ref_tokens=16)
  state = init_train_state(params, optimizer, jax.random.PRNGKey(1))
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(lambda s: apply_gradients(s, optimizer, jnp.float32(1.0), grads))
  new_state, applied, norm = step(state)
  assert not bool(applied) and np.isfinite(float(norm))
  assert int(new_state["skipped"]) == 1 and int(new_state["step"]) == 1
  for old, new in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(new_state["params"])):
    np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
  for old, new in zip(jax.tree.leaves(state["opt_state"]),
                      jax.tree.leaves(new_state["opt_state"])):
    if old.shape:   # the moments (the counts are scalars)
      np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new_state))
  again, _, _ = step(new_state)
  assert int(again["skipped"]) == 2


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
@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
  from adjax.pretrain import pretrain
  workdir = str(tmp_path_factory.mktemp("run_a"))
  summary = pretrain(tiny_config(dataset, with_validation=True), workdir, progress=False,
                     make_evaluator=selection_evaluator)
  return workdir, summary


def _metrics(workdir):
  rows = [json.loads(line) for line in open(run_layout.metrics_path(workdir))]
  return {row["step"]: row for row in rows if "loss" in row}


def test_pretraining_lowers_the_loss(dataset, uninterrupted):
  from adjax.from_config import build_backbone
  from adjax.checkpointing import final_params
  from adjax.pretrain.derived import load_centers
  from adjax.pretrain import make_loader, pretrain_records, step_settings
  from adjax.pretrain.step import batch_loss
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
    from adjax.evaluate.selection import selection_evaluator
    from adjax.pretrain import pretrain
    from run_helpers import tiny_config
    original = checkpointing.RunCheckpointer.save
    def save_then_die(self, step, *args, **kwargs):
      original(self, step, *args, **kwargs)
      if step == {kill_at}:
        self.wait()                      # the step-{kill_at} checkpoint is complete on disk
        os.kill(os.getpid(), signal.SIGKILL)
    checkpointing.RunCheckpointer.save = save_then_die
    pretrain(tiny_config({data!r}, with_validation=True), {workdir!r}, progress=False,
             make_evaluator=selection_evaluator)
""")


def test_resume_after_sigkill_is_exact(dataset, uninterrupted, tmp_path):
  from adjax.checkpointing import final_params
  from adjax.pretrain import pretrain
  reference_dir, _ = uninterrupted
  workdir = str(tmp_path / "run_b")
  script = _KILLED_RUN.format(repo=str(REPO), tests=str(SUPPORT), kill_at=4, data=dataset,
                              workdir=workdir)
  proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ),
                        capture_output=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
  steps_on_disk = sorted(int(p) for p in os.listdir(run_layout.checkpoints_dir(workdir))
                         if p.isdigit())
  assert steps_on_disk[-1] == 4
  # SIGKILL left the run's lock (adjax/workdir_lock.py); its process is gone, so the resumed
  # run takes it over, and gives it back when it ends.
  lock = os.path.join(workdir, ".adjax.lock")
  assert json.load(open(lock))["pid"] != os.getpid()
  summary = pretrain(tiny_config(dataset, with_validation=True), workdir, progress=False,
                     make_evaluator=selection_evaluator)
  assert summary["steps"] == 6
  assert not os.path.exists(lock)
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
      sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(SUPPORT)!r})
      from adjax.pretrain import step as train_step
      from adjax.pretrain import pretrain
      from run_helpers import tiny_config
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
      # The tests' shared cache when there is one (its programs are those of the other tiny
      # runs: a folder of its own would compile all of them again).
      config.train.compilation_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "xla_cache")
      summary = pretrain(config, "run_c", progress=False)  # relative, as users type it
      import jax
      print("PREEMPTED", summary["preempted"], summary["steps"])
      print("CACHE", jax.config.jax_compilation_cache_dir)
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=600,
                        cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr.decode()[-3000:]
  assert b"PREEMPTED True 1" in proc.stdout
  steps = [int(p) for p in os.listdir(run_layout.checkpoints_dir(workdir)) if p.isdigit()]
  assert steps == [1]
  # train.compilation_cache: the run used the folder and its programs are there for the next
  # attempt (that a new program is written is test_compilation_cache_stores_programs's).
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path / "xla_cache")
  assert f"CACHE {os.path.abspath(cache)}".encode() in proc.stdout
  assert any(name.endswith("-cache") for name in os.listdir(cache))


def test_compilation_cache_stores_programs(tmp_path):
  """use_compilation_cache: a program compiled after it is written to the folder (in a
  process of its own: the setting is process-wide)."""
  script = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(REPO)!r})
      import jax, jax.numpy as jnp
      from adjax.compilation_cache import use_compilation_cache
      assert use_compilation_cache({str(tmp_path / "cache")!r}, min_compile_seconds=0)
      print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((3, 3))).sum()))
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
  assert proc.returncode == 0, proc.stderr.decode()[-3000:]
  assert any(name.endswith("-cache") for name in os.listdir(tmp_path / "cache"))


def test_compilation_cache_setting_is_checked(tmp_path):
  from adjax.compilation_cache import use_compilation_cache
  assert use_compilation_cache("") is False       # off: JAX's own settings stay
  (tmp_path / "a_file").write_text("")
  with pytest.raises(NotADirectoryError, match="compilation_cache=.*is a file"):
    use_compilation_cache(str(tmp_path / "a_file"))


def test_centres_follow_what_the_projector_sees(dataset, tmp_path):
  # Residuals by default; raw features in the residual-off ablation (mean over the same
  # normal images, computed here independently of compute_centers' arithmetic).
  from adjax.from_config import build_backbone
  from adjax.pretrain import compute_centers, pretrain_records
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
  from adjax.pretrain.loop import _check_run_settings
  from adjax.pretrain import pretrain
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
  # Paths, length, logging and evaluation may change when a run resumes. (pretrain() resolves
  # data.augment_on before it compares; so does this test.)
  from adjax.pretrain.setup import resolve_augment_place
  config = resolve_augment_place(tiny_config(dataset))
  config.optim.max_steps = 12
  config.data.pretrain_root = "/elsewhere/data"
  config.train.checkpoint_every = 5
  config.eval.shots = 4
  config.data.num_workers = 3      # another machine: the loader starts at the saved step
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
  assert _check_run_settings(resolve_augment_place(tiny_config(dataset)), attempt) is False


def test_metrics_log_drops_steps_a_resume_repeats_and_writes_nan_as_null(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  for step in range(1, 6):
    files.append_jsonl(path, {"step": step, "loss": float(step)})
  files.append_jsonl(path, {"step": 6, "loss": float("nan"), "x": np.float32("inf")})
  with open(path, "a") as f:
    f.write('{"step": 7, "lo')     # torn by a kill
  rows = [json.loads(line) for line in open(path) if line.endswith("\n")]
  assert rows[-1] == {"step": 6, "loss": None, "x": None}
  files.truncate_jsonl(path, 3)
  assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3]
  # Results files too (a class with one test label has NaN image metrics).
  results = str(tmp_path / "results.json")
  files.write_json(results, {"a": {"auroc": float("nan"), "ap": np.float32(0.5)},
                                  "b": [np.float64("inf"), 1.0], "c": np.array([np.nan, 2.0])})
  text = open(results).read()
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"a": {"auroc": None, "ap": 0.5}, "b": [None, 1.0],
                              "c": [None, 2.0]}


def test_final_selection_is_replaced_when_a_finished_run_is_extended(tmp_path):
  # (pretrain rewrites it only when it trained: a rerun of a finished run keeps it.)
  from adjax.pretrain.loop import _BestTracker
  workdir = str(tmp_path / "run")
  params = {"w": np.zeros(2, np.float32)}
  for kind in run_layout.KINDS:
    run_layout.save_best(workdir, kind, params, {"step": 6, "selected_by": "final"})
  assert not _BestTracker(workdir).evaluated        # the extended run's end replaces them
  run_layout.save_best(workdir, "angle", params, {"step": 6, "score": 0.7})
  tracker = _BestTracker(workdir)
  assert tracker.evaluated and tracker.best == {"angle": 0.7}


# --------------------------------------------------------------------- evaluation
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
