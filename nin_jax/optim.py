"""Optimizers and learning-rate schedules, with Caffe's per-layer semantics.

Caffe trains NIN with lr and weight-decay multipliers per parameter: biases learn
at 2x the rate without weight decay, and some layers (the CIFAR model's last 1x1
layer) learn at 0.1x. `caffe_multipliers` derives both trees from parameter
paths, so the same optimizer code serves every model.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from nin_jax import durations
from nin_jax.errors import ConfigError
from nin_jax.model import models

SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "adamw")


def make_schedule(
  *,
  name: str,
  learning_rate: float,
  total_steps: int,
  warmup_steps: int = 0,
  decay_steps: tuple[int, ...] = (),
  decay_factor: float = 0.1,
) -> optax.Schedule:
  """`constant`, `step` (multiply by `decay_factor` at each of `decay_steps`) or `cosine`
  (to zero at `total_steps`); each optionally after a linear warm-up from zero."""
  if name == "constant":
    main = optax.constant_schedule(learning_rate)
  elif name == "step":
    main = optax.piecewise_constant_schedule(
      learning_rate, {max(int(s) - warmup_steps, 1): decay_factor for s in decay_steps}
    )
  elif name == "cosine":
    main = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup_steps, 1))
  else:
    raise ValueError(f"Unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}.")
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def _path_keys(path: tuple) -> list:
  """A state path's plain keys, e.g. ['blocks', 2, 'mlp', 1, 'bias'] (no trailing 'value')."""
  keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
  return keys[:-1] if keys and keys[-1] == "value" else keys


def param_layer_name(spec: models.ModelSpec, path: tuple) -> str:
  """Caffe's layer name (conv1, cccp3, ..., fc) of a parameter, from its state path."""
  keys = _path_keys(path)
  if keys[0] == "classifier":
    return "fc"
  block = int(keys[1])
  names = models.layer_names(spec)[block]
  return names[0] if keys[2] == "conv" else names[1 + int(keys[3])]


def caffe_multipliers(
  params, spec: models.ModelSpec, *, bias_lr_mult: float, bias_weight_decay: bool, layer_lr_mults: Mapping[str, float]
):
  """Trees of per-parameter lr multipliers and weight-decay masks, as Caffe's prototxt."""
  unknown = set(layer_lr_mults) - {n for row in models.layer_names(spec) for n in row} - {"fc"}
  if unknown:
    raise ValueError(
      f"layer_lr_mults names unknown layers {sorted(unknown)}; "
      f"layers are: {', '.join(n for row in models.layer_names(spec) for n in row)}."
    )

  def lr_mult(path, _):
    is_bias = _path_keys(path)[-1] == "bias"
    return float(layer_lr_mults.get(param_layer_name(spec, path), 1.0)) * (bias_lr_mult if is_bias else 1.0)

  def decays(path, _):
    return bias_weight_decay or _path_keys(path)[-1] != "bias"

  return (jax.tree_util.tree_map_with_path(lr_mult, params), jax.tree_util.tree_map_with_path(decays, params))


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each update by its own constant (Caffe's `lr_mult`)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
  *, name: str, schedule: optax.Schedule, weight_decay: float, momentum: float, nesterov: bool, lr_mults, decay_mask
) -> optax.GradientTransformation:
  """SGD with Caffe's update (lr * mult * (grad + wd * w), then momentum) or AdamW."""
  if name == "sgd":
    return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      scale_by_tree(lr_mults),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(schedule),
    )
  if name == "adamw":
    return optax.chain(
      optax.scale_by_adam(),
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      scale_by_tree(lr_mults),
      optax.scale_by_learning_rate(schedule),
    )
  raise ValueError(f"Unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}.")


def from_config(
  config, spec: models.ModelSpec, abstract_params, num_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The config's optimizer and schedule; durations become steps, lr scales with the batch."""
  learning_rate = config.learning_rate * (
    config.batch_size / config.base_batch_size if config.base_batch_size > 0 else 1.0
  )
  schedule = make_schedule(
    name=config.schedule,
    learning_rate=learning_rate,
    total_steps=num_steps,
    warmup_steps=durations.steps(config, "warmup", steps_per_epoch),
    decay_steps=durations.steps(config, "decay", steps_per_epoch),
    decay_factor=config.decay_factor,
  )
  try:
    lr_mults, decay_mask = caffe_multipliers(
      abstract_params,
      spec,
      bias_lr_mult=config.bias_lr_mult,
      bias_weight_decay=config.bias_weight_decay,
      layer_lr_mults=dict(config.layer_lr_mults),
    )
  except ValueError as e:
    raise ConfigError(str(e)) from e
  tx = make_optimizer(
    name=config.optimizer,
    schedule=schedule,
    weight_decay=config.weight_decay,
    momentum=config.momentum,
    nesterov=config.nesterov,
    lr_mults=lr_mults,
    decay_mask=decay_mask,
  )
  return tx, schedule
