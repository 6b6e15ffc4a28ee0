"""The views' colour augmentation in JAX, for running inside the compiled train step.

The same recipe and formulas as data_pipelines/augment.py (docs/method.md section 5):
RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8) with the four operations in a random
order, RandomGrayscale(p=0.2), RandomApply(GaussianBlur(sigma in [0.1, 2]), p=0.5). An
augmentation is a draw (`draw_color_params`: a pytree of per-image choices, the same keys as
augment.draw_color_params, so the numpy code can apply a JAX draw) and an application
(`apply_color_params`). `augment_views` augments a batch's two views, each image keyed by
fold_in(fold_in(fold_in(rng, step), view), position in the global batch): a pure function of
the train state and the batch, so a resumed run draws the same augmentations.

Why on the device: on the host the two views' colour augmentation costs ~8 ms of CPU of the
~13 ms an example costs with the reference bank (512 px JPEG sources at 224 px,
benchmarks/bench_pipeline.py); without it an example is ~4 ms, a quarter of a core at 65
examples/s. On an accelerator it is a few elementwise passes over images the step reads
anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from adjax.errors import UserError

Array = jax.Array
Params = dict[str, Array]

_LUMA = (0.299, 0.587, 0.114)
AUGMENT_ON = ("auto", "host", "device")


def grayscale(x: Array) -> Array:
  """Luma (..., H, W) of a float RGB image (..., H, W, 3) (ITU-R 601)."""
  return x @ jnp.asarray(_LUMA, x.dtype)


def adjust_brightness(x: Array, factor: Array) -> Array:
  return jnp.clip(x * factor, 0.0, 255.0)


def adjust_contrast(x: Array, factor: Array) -> Array:
  """Blends with the image's mean luma."""
  mean = grayscale(x).mean()
  return jnp.clip(factor * x + (1.0 - factor) * mean, 0.0, 255.0)


def adjust_saturation(x: Array, factor: Array) -> Array:
  """Blends with the per-pixel luma."""
  return jnp.clip(factor * x + (1.0 - factor) * grayscale(x)[..., None], 0.0, 255.0)


def rgb_to_hsv(x: Array) -> Array:
  """RGB in [0, 1] to HSV in [0, 1] (hue in turns), as augment.rgb_to_hsv."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc = jnp.maximum(jnp.maximum(r, g), b)
  minc = jnp.minimum(jnp.minimum(r, g), b)
  delta = maxc - minc
  safe = jnp.where(delta > 0, delta, 1)
  s = delta / jnp.where(maxc > 0, maxc, 1)
  h = jnp.where(maxc == r, (g - b) / safe,
                jnp.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
  h = jnp.where(delta > 0, jnp.mod(h / 6, 1), 0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(x: Array) -> Array:
  """HSV in [0, 1] to RGB in [0, 1], as augment.hsv_to_rgb."""
  h, s, v = x[..., 0], x[..., 1], x[..., 2]
  out = []
  for n in (5, 3, 1):
    k = jnp.mod(n + 6 * h, 6)
    out.append(v - v * s * jnp.clip(jnp.minimum(k, 4 - k), 0, 1))
  return jnp.stack(out, axis=-1)


def adjust_hue(x: Array, shift: Array) -> Array:
  """Rotates the hue by `shift` turns."""
  hsv = rgb_to_hsv(x / 255.0)
  hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0))
  return jnp.clip(hsv_to_rgb(hsv) * 255.0, 0.0, 255.0)


def max_blur_radius(max_sigma: float) -> int:
  """The kernel radius scipy's gaussian_filter uses at truncate=3 for the largest sigma."""
  return int(3.0 * max_sigma + 0.5)


def gaussian_blur(x: Array, sigma: Array, max_sigma: float = 2.0) -> Array:
  """Separable Gaussian blur of (H, W, C) over H then W, as augment.gaussian_blur (scipy's
  gaussian_filter, truncate 3, "reflect" borders = the edge pixel repeated).

  sigma is traced (one per image), so the kernel has the static width of `max_sigma` and the
  taps beyond int(3 sigma + 0.5) are zero: the same kernel scipy builds for sigma <= max_sigma.
  """
  radius = max_blur_radius(max_sigma)
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.where(jnp.abs(taps) <= jnp.floor(3.0 * sigma + 0.5),
                      jnp.exp(-0.5 / (sigma * sigma) * taps ** 2), 0.0)
  weights = weights / weights.sum()
  for axis in (0, 1):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    x = sum(weights[k] * jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
            for k in range(2 * radius + 1))
  return x


def draw_color_params(key: Array, *,
                      jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
                      jitter_p: float = 0.8, grayscale_p: float = 0.2,
                      blur_sigma: tuple[float, float] = (0.1, 2.0), blur_p: float = 0.5
                      ) -> Params:
  """The random choices of one image's augmentation (keys as augment.draw_color_params).

  Returns:
    {"jitter": bool, "order": (4,) int32 permutation of augment.JITTER_OPS, "brightness",
    "contrast", "saturation": factors in [max(0, 1 - x), 1 + x], "hue": shift in [-x, x]
    turns, "grayscale": bool, "blur": bool, "sigma": in blur_sigma}.
  """
  k_apply, k_order, k_factors, k_hue, k_sigma = jax.random.split(key, 5)
  u = jax.random.uniform(k_apply, (3,))
  low = jnp.asarray([max(0.0, 1 - j) for j in jitter[:3]], jnp.float32)
  high = jnp.asarray([1 + j for j in jitter[:3]], jnp.float32)
  factors = jax.random.uniform(k_factors, (3,), minval=low, maxval=high)
  return {
      "jitter": u[0] < jitter_p,
      "order": jax.random.permutation(k_order, 4).astype(jnp.int32),
      "brightness": factors[0], "contrast": factors[1], "saturation": factors[2],
      "hue": jax.random.uniform(k_hue, (), minval=-jitter[3], maxval=jitter[3]),
      "grayscale": u[1] < grayscale_p,
      "blur": u[2] < blur_p,
      "sigma": jax.random.uniform(k_sigma, (), minval=blur_sigma[0], maxval=blur_sigma[1]),
  }


def apply_color_params(image: Array, params: Params, *, max_sigma: float = 2.0) -> Array:
  """One image's augmentation: (H, W, 3) uint8 (or float in [0, 255]) -> (H, W, 3) uint8.

  Every branch is computed and the chosen one selected (under vmap a conditional is a select
  anyway): the cost is the same for every draw, which suits a compiled step.
  """
  x = image.astype(jnp.float32)
  ops = (lambda y: adjust_brightness(y, params["brightness"]),
         lambda y: adjust_contrast(y, params["contrast"]),
         lambda y: adjust_saturation(y, params["saturation"]),
         lambda y: adjust_hue(y, params["hue"]))
  # A loop, not four unrolled switches: one copy of the four operations in the program
  # (under vmap each switch computes every branch), which compiles several times faster.
  jittered = jax.lax.fori_loop(
      0, 4, lambda position, y: jax.lax.switch(params["order"][position], ops, y), x)
  x = jnp.where(params["jitter"], jittered, x)
  x = jnp.where(params["grayscale"], jnp.repeat(grayscale(x)[..., None], 3, axis=-1), x)
  x = jnp.where(params["blur"], gaussian_blur(x, params["sigma"], max_sigma), x)
  return jnp.clip(jnp.rint(x), 0, 255).astype(jnp.uint8)


def example_keys(key: Array, count: int) -> Array:
  """One key per image of a batch: fold_in(key, position)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(count, dtype=jnp.uint32))


def augment_keyed(images: Array, keys: Array) -> Array:
  """Image i of (N, H, W, 3) augmented with the draw of keys[i]."""
  return jax.vmap(lambda image, k: apply_color_params(image, draw_color_params(k)))(images,
                                                                                  keys)


def augment_batch(images: Array, key: Array) -> Array:
  """Independent augmentations of (B, H, W, 3) images, image b keyed by fold_in(key, b)."""
  return augment_keyed(images, example_keys(key, images.shape[0]))


def view_key(rng: Array, step: Array, view: int) -> Array:
  """The key of a step's view (1 or 2): fold_in(fold_in(rng, step), view)."""
  return jax.random.fold_in(jax.random.fold_in(rng, step), view)


def augment_views(view1: Array, view2: Array, rng: Array, step: Array) -> tuple[Array, Array]:
  """Both views of a (global) batch augmented independently, as the host pipeline does.

  Args:
    view1, view2: (B, S, S, 3) uint8, the plain images (the same array twice is fine).
    rng: the train state's key (constant over a run); step: the state's step counter. Image b
      of view v gets fold_in(fold_in(fold_in(rng, step), v), b): a step and a batch position
      name one example of the run, whatever host or device produced it.

  Returns:
    the augmented views, (B, S, S, 3) uint8.
  """
  b = view1.shape[0]
  keys = jnp.concatenate([example_keys(view_key(rng, step, 1), b),
                          example_keys(view_key(rng, step, 2), b)])
  # One vmap over both views: one copy of the augmentation in the compiled program.
  both = augment_keyed(jnp.concatenate([view1, view2]), keys)
  return both[:b], both[b:]


def augment_placement(augment: bool, augment_on: str, backend: str) -> tuple[bool, bool]:
  """(host_augment, device_augment) from config.data.augment and config.data.augment_on.

  "auto" augments on the device on accelerators and on the host on CPU (where the demo's
  figures were made with host augmentation, and where device augmentation would only move the
  same work into the step).
  """
  if augment_on not in AUGMENT_ON:
    raise UserError(f"config.data.augment_on must be one of {', '.join(AUGMENT_ON)}, got "
                    f"{augment_on!r}")
  if not augment:
    return False, False
  on_device = augment_on == "device" or (augment_on == "auto" and backend != "cpu")
  return not on_device, on_device

