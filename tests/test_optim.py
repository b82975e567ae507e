"""Caffe's optimizer semantics and the schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nin_jax import optim
from nin_jax.model import models


def test_caffe_multipliers_for_the_cifar_recipe():
  model = models.create_model("nin_cifar10")
  params = nnx.state(model, nnx.Param)
  mults, decays = optim.caffe_multipliers(
    params, model.spec, bias_lr_mult=2.0, bias_weight_decay=False, layer_lr_mults={"cccp6": 0.1}
  )
  path_mult = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mults)}
  assert path_mult["['blocks'][2]['mlp'][1]['kernel'].value"] == pytest.approx(0.1)
  assert path_mult["['blocks'][2]['mlp'][1]['bias'].value"] == pytest.approx(0.2)
  assert path_mult["['blocks'][0]['conv']['kernel'].value"] == 1.0
  assert path_mult["['blocks'][0]['conv']['bias'].value"] == 2.0
  path_decay = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(decays)}
  assert all(v == (not k.endswith("['bias'].value")) for k, v in path_decay.items())


def test_unknown_layer_names_are_rejected():
  model = models.create_model("nin_cifar10")
  with pytest.raises(ValueError, match="unknown layers \\['cccp9'\\]"):
    optim.caffe_multipliers(
      nnx.state(model, nnx.Param), model.spec, bias_lr_mult=2.0, bias_weight_decay=False, layer_lr_mults={"cccp9": 0.1}
    )


def test_sgd_step_matches_caffe_update():
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
  grads = {"w": jnp.array([0.1, 0.2]), "b": jnp.array([0.3])}
  tx = optim.make_optimizer(
    name="sgd",
    schedule=lambda step: 0.1,
    weight_decay=0.01,
    momentum=0.9,
    nesterov=False,
    lr_mults={"w": 1.0, "b": 2.0},
    decay_mask={"w": True, "b": False},
  )
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  # Caffe: v = lr * mult * (g + wd * w); w -= v (first step, zero history).
  np.testing.assert_allclose(updates["w"], -0.1 * (np.array([0.1, 0.2]) + 0.01 * np.array([1.0, -2.0])), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], -0.1 * 2.0 * np.array([0.3]), rtol=1e-6)
  updates2, _ = tx.update(grads, state, params)  # Momentum accumulates.
  np.testing.assert_allclose(updates2["b"], -0.1 * 2.0 * 0.3 * 1.9, rtol=1e-6)


def test_step_schedule_with_warmup():
  s = optim.make_schedule(
    name="step", learning_rate=0.1, total_steps=100, warmup_steps=10, decay_steps=(50, 80), decay_factor=0.1
  )
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(0.05)
  assert float(s(10)) == pytest.approx(0.1)
  assert float(s(49)) == pytest.approx(0.1)
  assert float(s(50)) == pytest.approx(0.01)
  assert float(s(80)) == pytest.approx(0.001)


def test_cosine_schedule_reaches_zero():
  s = optim.make_schedule(name="cosine", learning_rate=0.1, total_steps=100, warmup_steps=0)
  assert float(s(0)) == pytest.approx(0.1)
  assert float(s(50)) == pytest.approx(0.05)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError, match="choose one of"):
    optim.make_schedule(name="linear", learning_rate=0.1, total_steps=10)
