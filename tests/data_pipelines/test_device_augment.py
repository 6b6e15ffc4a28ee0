"""Device colour augmentation: the JAX math against the numpy pipeline's on the same draws, the
draws' distributions, the keying (step, view, batch position), the train step with it
(jit, finite, deterministic), a sharded batch, and reduced-scale JPEG decoding."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from adjax.errors import UserError
from data_pipelines import augment
from data_pipelines import device_augment as da
from data_pipelines import images

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def image():
  # Smooth colour gradients plus noise: every hue sector, grey pixels (delta = 0) and
  # saturated ones, so every branch of the HSV formulas is exercised.
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:32, 0:32] / 31.0
  base = np.stack([x, y, 1 - x * y], axis=-1) * 255
  out = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
  out[:4, :4] = 128   # grey: zero saturation
  out[-4:, -4:] = 0   # black: zero value
  return out


# ----------------------------------------------------------------------- math vs numpy
@pytest.mark.parametrize("name, arg", [
    ("adjust_brightness", 1.31), ("adjust_contrast", 0.67), ("adjust_saturation", 1.38),
    ("adjust_hue", 0.083), ("adjust_hue", -0.1), ("gaussian_blur", 0.1),
    ("gaussian_blur", 0.83), ("gaussian_blur", 1.3), ("gaussian_blur", 2.0)])
def test_each_operation_matches_numpy(image, name, arg):
  # Float in, float out: the two implementations agree to float32 rounding (0..255 scale).
  # Sigma 0.83 gives scipy radius int(2.99) = 2 and 1.3 radius 4: the traced kernel must
  # zero exactly the taps scipy leaves out.
  x = image.astype(np.float32)
  want = getattr(augment, name)(x, arg)
  got = np.asarray(jax.jit(getattr(da, name))(x, jnp.float32(arg)))
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)


def test_grayscale_matches_numpy(image):
  x = image.astype(np.float32)
  np.testing.assert_allclose(np.asarray(da.grayscale(x)), augment.grayscale(x), atol=1e-3)


def _assert_rounding_close(got, want, share=1e-3):
  diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
  assert diff.max() <= 1, diff.max()
  assert (diff > 0).mean() <= share, (diff > 0).mean()


def test_full_chain_matches_numpy_on_jax_draws(image):
  keys = jax.random.split(jax.random.PRNGKey(3), 64)
  params = jax.vmap(da.draw_color_params)(keys)
  got = np.asarray(jax.jit(jax.vmap(da.apply_color_params, in_axes=(None, 0)))(image, params))
  host = jax.device_get(params)
  # The 64 draws cover every step on and off and every first operation.
  for flag in ("jitter", "grayscale", "blur"):
    assert 0 < host[flag].sum() < 64, flag
  assert set(host["order"][:, 0].tolist()) == {0, 1, 2, 3}
  for i in range(64):
    one = {k: v[i] for k, v in host.items()}
    _assert_rounding_close(got[i], augment.apply_color_params(image, one))


def test_full_chain_matches_numpy_on_numpy_draws(image):
  # The other way round: the host pipeline's own draws (color_augment) applied by the JAX code.
  apply = jax.jit(da.apply_color_params)
  for seed in range(24):
    params = augment.draw_color_params(np.random.default_rng(seed))
    want = augment.color_augment(image, np.random.default_rng(seed))
    got = np.asarray(apply(image, {k: jnp.asarray(v) for k, v in params.items()}))
    _assert_rounding_close(got, want)


# ----------------------------------------------------------------------- draws
def test_draws_have_the_recipes_distributions():
  n = 4000
  p = jax.device_get(jax.vmap(da.draw_color_params)(
      jax.random.split(jax.random.PRNGKey(0), n)))
  for flag, prob in (("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5)):
    sd = np.sqrt(prob * (1 - prob) / n)
    assert abs(p[flag].mean() - prob) < 4 * sd, (flag, p[flag].mean())
  for name, (lo, hi) in (("brightness", (0.6, 1.4)), ("contrast", (0.6, 1.4)),
                         ("saturation", (0.6, 1.4)), ("hue", (-0.1, 0.1)),
                         ("sigma", (0.1, 2.0))):
    v = p[name].astype(np.float64)
    width = hi - lo
    assert lo <= v.min() and v.max() <= hi, name
    assert v.min() < lo + 0.01 * width and v.max() > hi - 0.01 * width, name
    # Uniform: mean (lo + hi) / 2 within 4 standard errors, variance width^2 / 12 within 10 %.
    assert abs(v.mean() - (lo + hi) / 2) < 4 * width / np.sqrt(12 * n), name
    assert abs(v.var() / (width ** 2 / 12) - 1) < 0.1, name
  assert (np.sort(p["order"], axis=1) == np.arange(4)).all()
  first = np.bincount(p["order"][:, 0], minlength=4) / n
  assert np.abs(first - 0.25).max() < 4 * np.sqrt(0.25 * 0.75 / n)
  # Independent choices: the flags and factors are uncorrelated.
  stacked = np.stack([p["jitter"], p["grayscale"], p["blur"], p["brightness"], p["contrast"],
                      p["saturation"], p["hue"], p["sigma"]]).astype(np.float64)
  corr = np.corrcoef(stacked) - np.eye(len(stacked))
  assert np.abs(corr).max() < 4 / np.sqrt(n)


# ----------------------------------------------------------------------- keying
def test_views_are_keyed_by_step_view_and_batch_position(image):
  batch = np.stack([image] * 4)
  rng, step = jax.random.PRNGKey(7), jnp.int32(5)
  v1, v2 = jax.jit(da.augment_views)(batch, batch, rng, step)
  v1, v2 = np.asarray(v1), np.asarray(v2)
  one = jax.jit(lambda key: da.apply_color_params(image, da.draw_color_params(key)))
  for b in range(4):
    for view, got in ((1, v1[b]), (2, v2[b])):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, 5), view), b)
      # Compiled apart, a pixel may round the other way.
      _assert_rounding_close(got, np.asarray(one(key)))
    assert not np.array_equal(v1[b], v2[b]), b   # the two views differ
  assert len({v1[b].tobytes() for b in range(4)}) == 4   # so do the images of a batch
  other, _ = jax.jit(da.augment_views)(batch, batch, rng, jnp.int32(6))
  assert not np.array_equal(np.asarray(other), v1)       # and the steps


def test_augment_placement():
  assert da.augment_placement(True, "auto", "cpu") == (True, False)
  assert da.augment_placement(True, "auto", "gpu") == (False, True)
  assert da.augment_placement(True, "host", "tpu") == (True, False)
  assert da.augment_placement(True, "device", "cpu") == (False, True)
  assert da.augment_placement(False, "device", "gpu") == (False, False)
  with pytest.raises(UserError, match="augment_on"):
    da.augment_placement(True, "gpu", "gpu")


# ----------------------------------------------------------------------- train step
@pytest.fixture(scope="module")
def tiny_step():
  from adjax.models.backbones import get_backbone
  from adjax.models.projector import init_projector
  from adjax.optim import make_optimizer
  from adjax.pretrain.step import StepSettings, init_train_state, make_train_step
  backbone = get_backbone("tiny-vit", depth=1, taps=(1,))
  frozen = {"backbone": backbone.init(jax.random.PRNGKey(0)), "centers": None}
  # Backbone.extract builds its jitted function on first use; built inside the first step's
  # trace, its constants would be that trace's values and leak into the second step's.
  backbone.extract(frozen["backbone"], jnp.zeros((1, 28, 28, 3)))
  optimizer = make_optimizer(1e-3, 5e-4, steps_per_epoch=10)
  params = init_projector(jax.random.PRNGKey(1), backbone.level_dims, num_heads=2,
                          num_ref_tokens=16)
  state = init_train_state(params, optimizer, jax.random.PRNGKey(2))
  steps = {}
  for on in (False, True):
    settings = StepSettings(level_strides=tuple(backbone.level_strides), num_heads=2,
                            compute_dtype=jnp.float32, angle_block_size=64, device_augment=on)
    steps[on] = jax.jit(make_train_step(settings, optimizer, backbone.extract))
  rng = np.random.default_rng(0)
  size = 28
  batch = {"view1": rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8),
           "masks": np.zeros((4, size, size), np.uint8),
           "refs": rng.integers(0, 256, (4, 2, size, size, 3), dtype=np.uint8),
           "ref_valid": np.ones((4, 2), bool)}
  batch["view2"] = batch["view1"]
  batch["masks"][:2, :14, :14] = 1
  return steps, state, batch, frozen


def test_train_step_augments_on_the_device(tiny_step):
  steps, state, batch, frozen = tiny_step
  new_state, metrics = steps[True](state, batch, frozen)
  loss = float(metrics["loss"])
  assert np.isfinite(loss) and float(metrics["finite"]) == 1.0
  # The same step without device augmentation, fed the views augment_views makes from the
  # state's rng and step, computes the same loss: the step augments exactly as specified.
  v1, v2 = jax.jit(da.augment_views)(batch["view1"], batch["view2"], state["rng"],
                                     state["step"])
  _, want = steps[False](state, {**batch, "view1": v1, "view2": v2}, frozen)
  # (Compiled apart, the augmentation may round a pixel in a thousand the other way: seen
  # 3e-6 relative.)
  np.testing.assert_allclose(loss, float(want["loss"]), rtol=3e-5)
  _, plain = steps[False](state, batch, frozen)
  assert abs(float(plain["loss"]) - loss) > 1e-3 * loss   # the augmentation changed the batch
  # view2 may be left out (the plain image is sent once): it is then view1.
  from adjax.pretrain.step import augmented_batch
  single, both = jax.jit(lambda s, v: (augmented_batch(s, {"view1": v}),
                                        augmented_batch(s, {"view1": v, "view2": v})))(
      state, batch["view1"])
  for key in ("view1", "view2"):
    np.testing.assert_array_equal(single[key], both[key])
  assert int(new_state["step"]) == 1
  np.testing.assert_array_equal(np.asarray(new_state["rng"]), np.asarray(state["rng"]))


def test_train_step_with_device_augmentation_is_deterministic(tiny_step):
  # What exact resume needs: the step is a function of (state, batch) alone.
  steps, state, batch, frozen = tiny_step
  (s1, m1), (s2, m2) = steps[True](state, batch, frozen), steps[True](state, batch, frozen)
  for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The next step draws other augmentations (its step count is in the key).
  _, m3 = steps[True](s1, batch, frozen)
  _, m3_step0 = steps[True]({**s1, "step": state["step"]}, batch, frozen)
  assert float(m3["loss"]) != float(m3_step0["loss"])


_SHARDED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from data_pipelines.device_augment import augment_views
    assert jax.device_count() == 4
    rng = np.random.default_rng(0)
    views = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    key, step = jax.random.PRNGKey(3), jnp.int32(2)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    sharded = jax.device_put(views, batch)
    fn = jax.jit(augment_views, in_shardings=(batch, batch, None, None),
                 out_shardings=(batch, batch))
    got = fn(sharded, sharded, key, step)
    assert got[0].sharding.spec == P("data"), got[0].sharding
    want = augment_views(views, views, key, step)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    print("ok")
""")


def test_augmentation_of_a_sharded_batch_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED.format(repo=REPO)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ----------------------------------------------------------------------- JPEG draft
def _encode(array, fmt, **kw):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt, **kw)
  return buf.getvalue()


def test_jpeg_draft_decodes_at_half_scale_and_keeps_the_mask(image):
  big = np.asarray(Image.fromarray(image).resize((640, 512), Image.BICUBIC))
  jpeg = _encode(big, "JPEG", quality=92)
  mask = np.zeros((512, 640), np.uint8)
  mask[100:300, 200:260] = 255
  mask_png = _encode(mask, "PNG")
  small, full_hw = images._decode_image(jpeg, "x.jpg", draft_short_side=224)
  assert small.shape == (256, 320, 3) and full_hw == (512, 640)   # 1/2 scale, not 1/4 (128)
  full_img, full_mask = images.preprocess_pair(jpeg, mask_png, 224)
  draft_img, draft_mask = images.preprocess_pair(jpeg, mask_png, 224, jpeg_draft=True)
  assert draft_img.shape == full_img.shape == (224, 224, 3)
  np.testing.assert_array_equal(draft_mask, full_mask)
  assert full_mask.sum() > 0
  mse = ((draft_img.astype(np.float64) - full_img) ** 2).mean()
  assert 10 * np.log10(255 ** 2 / mse) > 30     # same picture (smooth test image: ~40 dB)
  assert not np.array_equal(draft_img, full_img)   # but decoded another way
  # A PNG has no reduced-scale decoding: the setting changes nothing.
  png = _encode(big, "PNG")
  np.testing.assert_array_equal(images.preprocess_pair(png, None, 224, jpeg_draft=True)[0],
                                images.preprocess_pair(png, None, 224)[0])
  # A mask of another size than the full image is still refused.
  with pytest.raises(images.ImageDecodeError, match="640 x 512"):
    images.preprocess_pair(jpeg, _encode(mask[:256, :320], "PNG"), 224, jpeg_draft=True)


# ----------------------------------------------------------------------- a run
def test_run_with_device_augmentation_resumes_exactly(tmp_path):
  """A pretraining run augmenting on the device, stopped after 2 steps and continued to 4,
  ends bit-identical to one that ran the 4 steps at once; the run folder records where it
  augmented and which attention it trained with."""
  sys.path.insert(0, os.path.join(REPO, "tests", "support"))
  from run_helpers import tiny_config
  from adjax import run_layout
  from adjax.checkpointing import final_params
  from adjax.io import files
  from adjax.pretrain import pretrain
  from data_pipelines.embedded import generate_embedded_dataset
  data = generate_embedded_dataset(str(tmp_path / "data"), image_size=56, pretrain_classes=2,
                                   eval_classes=1, images_per_class=8)["pretrain_root"]

  def config(steps):
    c = tiny_config(data)
    c.data.augment_on = "device"
    c.optim.max_steps = steps
    return c

  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  pretrain(config(4), whole, progress=False)
  pretrain(config(2), parts, progress=False)
  summary = pretrain(config(4), parts, progress=False)
  assert summary["steps"] == 4
  want, got = final_params(whole), final_params(parts)
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert files.read_json(run_layout.config_path(parts))["data"]["augment_on"] == "device"
  attention = files.read_json(run_layout.attention_path(parts))
  assert attention["requested"] == "auto" and attention["implementation"] == "blocked"
  # Host augmentation draws other views: the same run with it ends elsewhere.
  host = str(tmp_path / "host")
  c = config(4)
  c.data.augment_on = "host"
  pretrain(c, host, progress=False)
  assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(final_params(host))))
