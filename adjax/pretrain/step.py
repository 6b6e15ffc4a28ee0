"""The pretraining step (docs/method.md section 5) as pure functions, compiled once with jax.jit.

One step: frozen backbone features of both views and of each image's reference images, the
residual of every token against its nearest reference token (own class and view; unused shots
masked), the projector on both views at once (the reference projection is shared), and per
level angle(e1, e2) + norm(e1) + norm(e2). Only the projector receives gradients.

Shapes are static: the number of shots varies per batch through `ref_valid`, not through
shapes. A step whose loss or gradient norm is not finite (a NaN or inf anywhere), or whose
update would make a parameter or an optimiser moment non-finite (an overflowing learning rate,
say), leaves the parameters and optimiser state unchanged and increments `skipped`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from adjax.labels import token_labels
from adjax.losses.angle import angle_loss
from adjax.losses.norm import norm_loss
from adjax.models.projector import project
from adjax.residual import residual_features
from adjax.sharding import DATA_AXIS
from data_pipelines.device_augment import augment_views

Array = jax.Array
Levels = list[Array]
TrainState = dict[str, Any]   # params, opt_state, step, rng, skipped
ExtractFn = Callable[[Any, Array], Levels]  # (backbone params, images in [0, 1]) -> levels


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the compiled step needs besides arrays (hashable: part of the compile key)."""
  level_strides: tuple[int, ...]
  num_heads: int = 16
  temperature: float = 0.15
  use_angle: bool = True
  use_norm: bool = True
  use_center: bool = True
  use_residual: bool = True
  angle_block_size: int = 2048
  label_threshold_share: float = 32 / 196
  max_similarities: int = 1 << 25
  compute_dtype: Any = jnp.bfloat16
  attention: str = "auto"   # projector.attention (adjax/models/reference_attention.py)
  # The step's device mesh. With more than one device the angle loss's rows are split over
  # its data axis (each device computes its rows against all; same value as one device).
  # None: the loss is computed whole (one device, or left to the compiler, which replicates it).
  mesh: Optional[Mesh] = None
  # Colour-augment the two views inside the step (data_pipelines/device_augment.py) instead of
  # on the host: the batch's view1 and view2 are the plain images (view2 may be left out: it is
  # then view1). Each image's draw is keyed by the state's rng, its step and its position in
  # the global batch, so a resumed run augments as the uninterrupted one did.
  device_augment: bool = False


def init_train_state(params: Any, optimizer: optax.GradientTransformation,
                     rng: Array) -> TrainState:
  """The train state: projector params (float32), optimiser state, counters and rng."""
  return {"params": params, "opt_state": optimizer.init(params),
          "step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32), "rng": rng}


def level_labels(masks: Array, strides: Sequence[int],
                 threshold_share: float) -> list[tuple[Array, Array]]:
  """(angle_labels, norm_labels) per level from pixel masks (B, S, S), each (B, S/s, S/s).

  A token of stride s is anomalous for the angle loss when more than threshold_share of its
  s * s pixels are set (32 of 196 at s = 14, the reference's rule).
  """
  return [token_labels(masks, patch_size=s, threshold=threshold_share * s * s) for s in strides]


def images_to_unit(images: Array) -> Array:
  """uint8 images to float32 in [0, 1] (batches travel as uint8: 4x less host->device)."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def reference_levels(extract: ExtractFn, backbone_params: Any, refs: Array,
                     ref_valid: Array) -> tuple[Levels, list[Array]]:
  """Backbone features of each image's reference images, flattened per image.

  Args:
    refs: (B, S_max, H, W, 3) reference images; ref_valid: (B, S_max) bool.

  Returns:
    (levels of (B, S_max * h * w, C), validity of each reference token (B, S_max * h * w)).
  """
  b, shots = refs.shape[:2]
  feats = extract(backbone_params, images_to_unit(refs.reshape(b * shots, *refs.shape[2:])))
  levels, valid = [], []
  for f in feats:
    _, h, w, c = f.shape
    levels.append(f.reshape(b, shots * h * w, c))
    valid.append(jnp.repeat(ref_valid, h * w, axis=1))
  return levels, valid


def bank_references(bank: Sequence[Array], groups: Array, ref_valid: Array,
                    own_slots: Array | None = None) -> tuple[Levels, list[Array]]:
  """Precomputed reference features: each image takes its (class, view) group's shots.

  Args:
    bank: per level (G, S_max + 1, h * w, C), the features of S_max + 1 normal images per
      group.
    groups: (B,) group index of each image; ref_valid: (B, S_max) bool (the step's n_shot).
    own_slots: (B, S_max + 1) bool, the bank slots that hold the image itself: an image is
      never its own reference (its residual would be ~0), as with references drawn per image.
      Each image takes the group's first S_max slots that are not its own, in order (None:
      the first S_max); should fewer be left (a tiny group repeating the image), its own
      slots that remain are masked out of ref_valid.
  """
  shots = ref_valid.shape[1]
  if own_slots is None:
    own_slots = jnp.zeros((groups.shape[0], shots + 1), bool)
  # A stable sort puts the other images' slots first, in their order, and the own ones last.
  take = jnp.argsort(own_slots.astype(jnp.int32), axis=1, stable=True)[:, :shots]   # (B, S)
  valid_slots = ref_valid & ~jnp.take_along_axis(own_slots, take, axis=1)
  levels, valid = [], []
  for level in bank:
    _, _, tokens, c = level.shape
    chosen = level[groups[:, None], take]                                   # (B, S, T, C)
    levels.append(chosen.reshape(groups.shape[0], shots * tokens, c))
    valid.append(jnp.repeat(valid_slots, tokens, axis=1))
  return levels, valid


def residual_levels(features: Levels, ref_feats: Levels, ref_valid: Sequence[Array],
                    settings: StepSettings) -> Levels:
  """Residuals of every level (or the raw features when the residual is switched off)."""
  if not settings.use_residual:
    return list(features)
  return [residual_features(f, r, v, max_similarities=settings.max_similarities)[0]
          for f, r, v in zip(features, ref_feats, ref_valid)]


def pretraining_loss(params: Any, residuals1: Levels, residuals2: Levels, masks: Array,
                     centers: Optional[Sequence[Array]],
                     settings: StepSettings) -> tuple[Array, dict[str, Array]]:
  """Sum over levels of angle(e1, e2) + norm(e1) + norm(e2) on projected residuals.

  Args:
    params: projector parameters.
    residuals1, residuals2: per level (B, h, w, C), the two views' residual features.
    masks: (B, S, S) pixel masks (shared by both views: same geometry).
    centers: per level (C,) or None.

  Returns:
    (loss, metrics) with per-level terms.
  """
  b = residuals1[0].shape[0]
  # The views interleaved image by image, (B, 2, ...) -> (2B, ...), not concatenated: with the
  # batch split over devices each device keeps both views of its own images (concatenating
  # along the split axis and slicing the views apart again moved them between devices with
  # collective-permutes). The projector works per image and token, so the order is free.
  both = [jnp.stack([r1, r2], axis=1).reshape(2 * b, *r1.shape[1:])
          for r1, r2 in zip(residuals1, residuals2)]
  projected = project(params, both, num_heads=settings.num_heads, dtype=settings.compute_dtype,
                      attention=settings.attention)
  labels = level_labels(masks, settings.level_strides, settings.label_threshold_share)
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for k, (out, (angle_labels, norm_labels)) in enumerate(zip(projected, labels)):
    out = out.astype(jnp.float32)  # losses and their norms in float32
    c = out.shape[-1]
    views = out.reshape(b, 2, *out.shape[1:])
    e1, e2 = views[:, 0].reshape(-1, c), views[:, 1].reshape(-1, c)
    angle_labels, norm_labels = angle_labels.reshape(-1), norm_labels.reshape(-1)
    level_total = jnp.zeros((), jnp.float32)
    if settings.use_angle:
      center = centers[k] if (settings.use_center and centers is not None) else None
      angle = angle_term(e1, e2, angle_labels, center, settings)
      metrics[f"angle/l{k + 1}"] = angle
      level_total += angle
    if settings.use_norm:
      norm = norm_loss(e1, norm_labels) + norm_loss(e2, norm_labels)
      metrics[f"norm/l{k + 1}"] = norm
      level_total += norm
    total += level_total
  metrics["loss"] = total
  return total, metrics


def angle_term(e1: Array, e2: Array, labels: Array, center: Optional[Array],
               settings: StepSettings) -> Array:
  """The angle loss of one level on the global batch, row-sharded over the mesh if there is one.

  Without this the compiler gathers the batch and every device computes all (2N)^2
  similarities: at batch 32 on 8 devices that is 8x the work of the whole loss per step.
  """
  loss = functools.partial(angle_loss, temperature=settings.temperature,
                           block_size=settings.angle_block_size)
  mesh = settings.mesh
  if mesh is None or mesh.size == 1:
    return loss(e1, e2, labels, center)
  rows = PartitionSpec(DATA_AXIS)
  # shard_map takes arrays only: the centre (replicated) is passed when there is one.
  args, specs = (e1, e2, labels), (rows, rows, rows)
  if center is not None:
    args, specs = args + (center,), specs + (PartitionSpec(),)

  def local_loss(a, b, m, *maybe_center):
    return loss(a, b, m, maybe_center[0] if maybe_center else None, axis_name=DATA_AXIS)

  return jax.shard_map(local_loss, mesh=mesh, in_specs=specs, out_specs=PartitionSpec())(*args)


def _advance_schedules(opt_state: Any) -> Any:
  """opt_state with every learning-rate schedule's step count advanced by one.

  Why: the recipe's lr steps down after epochs 7 and 9, counted in batches seen. A skipped
  step keeps Adam's moments and count (torch's Adam, whose step() is not called, does the
  same) but its batch was consumed, so the schedule moves on; else each skip would delay the
  decay by one step."""
  is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)
  return jax.tree.map(lambda node: node._replace(count=node.count + 1) if is_schedule(node)
                      else node, opt_state, is_leaf=is_schedule)


def state_is_finite(params: Any, opt_state: Any) -> Array:
  """True when every floating-point element of the parameters and the optimiser state is
  finite (integer leaves, the step counts, cannot be NaN).

  Why the odd arithmetic: on CPUs a reduction costs more than the update itself, so each
  parameter is checked together with its optimiser moments (the opt_state subtrees shaped as
  the params, e.g. Adam's mu and nu) in one reduction of p * 0 + mu * 0 + nu * 0, which is
  NaN exactly where one of them is not finite (and 0 elsewhere: no overflow). Other
  floating-point leaves are checked one by one.
  """
  structure = jax.tree.structure(params)
  shaped_as_params = lambda node: (not isinstance(node, jax.Array)
                                   and jax.tree.structure(node) == structure)
  parts = jax.tree.leaves(opt_state, is_leaf=shaped_as_params)
  moments = [jax.tree.leaves(part) for part in parts if shaped_as_params(part)]
  others = [part for part in parts if not shaped_as_params(part)
            and jnp.issubdtype(jnp.result_type(part), jnp.inexact)]
  flags = []
  for leaves in zip(jax.tree.leaves(params), *moments):
    floats = [x for x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if floats:
      flags.append(jnp.all(jnp.isfinite(sum(x * 0 for x in floats))))
  flags += [jnp.all(jnp.isfinite(x)) for x in others]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def apply_gradients(state: TrainState, optimizer: optax.GradientTransformation, loss: Array,
                    grads: Any) -> tuple[TrainState, Array, Array]:
  """One optimiser update, skipped (state kept, `skipped` + 1) unless the loss and the global
  gradient norm are finite (a NaN or inf in any gradient makes the norm one too) and so is
  every parameter and optimiser moment the update would make.

  Why the second check: finite gradients do not make a finite update. A learning rate that
  overflows float32, or a moment that does, turns finite gradients into NaN parameters, and
  every later step (and the selected checkpoint) would carry them.

  Returns the new state, the applied flag and the gradient norm. The update runs under
  lax.cond rather than as a select between new and old state: a select waits for the global
  check and then makes a second pass over every buffer (Adam on 42M parameters: 220 -> 85 ms),
  and keeping the old state for it stops the update from being made in place. So the
  candidate is computed twice: once outside the cond, fused into the finiteness reduction
  (read only, nothing stored), and once inside, written in place. On a shared 2-core CPU, Adam on
  8M parameters: 9 -> 15 ms (a cond inside the update choosing between old and new: 90 ms).
  """
  grad_norm = optax.global_norm(grads)
  params, opt_state = state["params"], state["opt_state"]

  def candidate(operands):
    params, opt_state = operands
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt_state

  def skip(operands):
    params, opt_state = operands
    return params, _advance_schedules(opt_state)

  applied = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
             & state_is_finite(*candidate((params, opt_state))))
  new_params, new_opt_state = jax.lax.cond(applied, candidate, skip, (params, opt_state))
  return {
      "params": new_params,
      "opt_state": new_opt_state,
      "step": state["step"] + 1,
      "skipped": state["skipped"] + (1 - applied.astype(jnp.int32)),
      "rng": state["rng"],
  }, applied, grad_norm


def make_train_step(settings: StepSettings, optimizer: optax.GradientTransformation,
                    extract: Optional[ExtractFn]) -> Callable:
  """The step `(state, batch, frozen) -> (state, metrics)`, not yet jitted.

  batch (numpy or global jax arrays, leading axis = images):
    view1, view2 (B, S, S, 3) uint8 (with settings.device_augment the plain images, augmented
    here; view2 may then be absent); masks (B, S, S); ref_valid (B, S_max) bool; and either
    refs (B, S_max, S, S, 3) uint8 (references through the backbone inside the step), or
    ref_group (B,) int32 and ref_self (B, S_max + 1) bool with frozen["ref_bank"]
    (precomputed reference features; see bank_references).
  frozen: {"backbone": backbone params, "centers": list of (C_k,) or None,
    optionally "ref_bank": per level (G, S_max + 1, h * w, C_k)}.
  """

  def step(state: TrainState, batch: dict[str, Array], frozen: dict[str, Any]):
    if settings.device_augment:
      batch = augmented_batch(state, batch)
    residuals1, residuals2 = batch_residuals(batch, frozen, settings, extract)
    return residual_update(state, residuals1, residuals2, batch["masks"],
                           frozen.get("centers"), settings, optimizer)

  return step


def augmented_batch(state: TrainState, batch: dict[str, Array]) -> dict[str, Array]:
  """The batch with both views colour-augmented on the device.

  The key is fold_in(state["rng"], state["step"]): the rng is a constant of the run and the
  step counter advances on every step (skipped ones too), both in every checkpoint, so the
  draws depend on nothing a resume could change (not on the host, its worker count or how
  many steps this process has run).
  """
  view1 = batch["view1"]
  view2 = batch.get("view2", view1)
  view1, view2 = augment_views(view1, view2, state["rng"], state["step"])
  return {**batch, "view1": view1, "view2": view2}


def batch_residuals(batch: dict[str, Array], frozen: dict[str, Any], settings: StepSettings,
                    extract: ExtractFn) -> tuple[Levels, Levels]:
  """Frozen part of the step: residual features of both views (no gradient flows back)."""
  backbone_params = frozen["backbone"]
  feats1 = extract(backbone_params, images_to_unit(batch["view1"]))
  feats2 = extract(backbone_params, images_to_unit(batch["view2"]))
  if not settings.use_residual:
    ref_feats, ref_valid = [None] * len(feats1), [None] * len(feats1)
  elif frozen.get("ref_bank") is not None:
    ref_feats, ref_valid = bank_references(frozen["ref_bank"], batch["ref_group"],
                                           batch["ref_valid"], batch.get("ref_self"))
  else:
    ref_feats, ref_valid = reference_levels(extract, backbone_params, batch["refs"],
                                            batch["ref_valid"])
  return jax.lax.stop_gradient(
      (residual_levels(feats1, ref_feats, ref_valid, settings),
       residual_levels(feats2, ref_feats, ref_valid, settings)))


def batch_loss(params: Any, batch: dict[str, Array], frozen: dict[str, Any],
               settings: StepSettings, extract: ExtractFn) -> tuple[Array, dict[str, Array]]:
  """The step's loss on a batch without updating anything (validation, tests)."""
  residuals1, residuals2 = batch_residuals(batch, frozen, settings, extract)
  return pretraining_loss(params, residuals1, residuals2, batch["masks"],
                          frozen.get("centers"), settings)


def residual_update(state: TrainState, residuals1: Levels, residuals2: Levels, masks: Array,
                    centers: Optional[Sequence[Array]], settings: StepSettings,
                    optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
  """Projector forward, losses, backward and update on given residual features."""
  (loss, metrics), grads = jax.value_and_grad(pretraining_loss, has_aux=True)(
      state["params"], residuals1, residuals2, masks, centers, settings)
  new_state, applied, grad_norm = apply_gradients(state, optimizer, loss, grads)
  metrics["finite"] = applied.astype(jnp.float32)   # 0: this step's update was not applied
  metrics["skipped"] = new_state["skipped"]
  metrics["grad_norm"] = grad_norm
  return new_state, metrics
