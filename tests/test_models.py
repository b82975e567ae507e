"""The model zoo: shapes, parameter counts and head semantics against the reference."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nin_jax.model import models
from tests.helpers import one_device_env

# Parameter counts, derived by hand from the layer widths: ImageNet from the Caffe model
# zoo's prototxt (its 29 MB float32 snapshot holds 7.6 M parameters), the others from the
# paper's cuda-convnet definitions (3 mlpconv blocks, widths as in `models.VARIANTS`).
EXPECTED_PARAMS = {
  "nin_imagenet": 7_595_176,
  "nin_cifar10": 966_986,
  "nin_cifar100": 984_356,
  "nin_svhn": 1_986_026,
  "nin_mnist": 349_674,
}


@pytest.mark.parametrize("name", list(models.VARIANTS))
def test_variant_output_shape_and_parameter_count(name):
  # Traced, not run (other tests run the models): shapes and counts need no numbers.
  model = models.abstract_model(name)
  spec = model.spec
  x = jax.ShapeDtypeStruct((2, spec.image_size, spec.image_size, spec.in_channels), jnp.float32)
  assert nnx.eval_shape(lambda m, x: m(x), model, x).shape == (2, spec.num_classes)
  assert models.count_params(model) == EXPECTED_PARAMS[name]


def test_multiply_adds_match_the_reference():
  macs = lambda name: models.total_mult_adds(models.abstract_model(name))
  assert round(macs("nin_imagenet") / 1e9, 3) == 1.100
  assert round(macs("nin_cifar10") / 1e9, 4) == 0.2225


def _shapes(rows):
  shapes = []
  for r in rows:
    s = "x".join(map(str, r.shape))
    if not shapes or shapes[-1] != s:
      shapes.append(s)
  return shapes


def test_imagenet_maps_follow_caffe_at_224():
  rows = models.summarize(models.abstract_model("nin_imagenet"), 224)
  assert _shapes(rows) == [
    "54x54x96",
    "27x27x96",
    "27x27x256",
    "13x13x256",
    "13x13x384",
    "6x6x384",
    "6x6x1024",
    "6x6x1000",
    "1x1x1000",
  ]


def test_imagenet_maps_follow_caffe_at_227():
  rows = models.summarize(models.abstract_model("nin_imagenet"), 227)
  assert _shapes(rows) == [
    "55x55x96",
    "27x27x96",
    "27x27x256",
    "13x13x256",
    "13x13x384",
    "6x6x384",
    "6x6x1024",
    "6x6x1000",
    "1x1x1000",
  ]


@pytest.mark.parametrize("name,sizes", [("nin_cifar10", [32, 16, 8]), ("nin_mnist", [28, 14, 7])])
def test_small_models_pool_with_ceil_rounding(name, sizes):
  rows = models.summarize(models.abstract_model(name))
  seen = [r.shape[0] for r in rows if r.name.startswith("conv")]
  assert seen == sizes


def test_cli_prints_the_imagenet_table(capsys):
  assert models.main(["nin_imagenet"]) == 0
  out = capsys.readouterr().out
  assert out.splitlines()[-2] == "total parameters: 7,595,176"
  assert "conv1" in out and "cccp8" in out


def test_cli_rejects_unknown_names_with_choices(capsys):
  assert models.main(["nin_foo"]) == 2
  assert "choose one of: nin_imagenet, nin_cifar10" in capsys.readouterr().err


def test_factory_errors_list_valid_choices():
  with pytest.raises(ValueError, match="choose one of: gap, fc, fc_dropout"):
    models.create_model("nin_cifar10", head="mlp")
  with pytest.raises(ValueError, match="choose one of: he, caffe"):
    models.create_model("nin_cifar10", init="xavier")
  with pytest.raises(ValueError, match="choose one of: float32, bfloat16"):
    models.create_model("nin_cifar10", dtype="float16")


@pytest.mark.slow
def test_caffe_init_uses_the_reference_stds():
  model = models.create_model("nin_imagenet", init="caffe", rngs=nnx.Rngs(0))
  stds = [float(jnp.std(layer.kernel[...])) for b in model.blocks for layer in b.layers()]
  expected = [s for b in model.spec.blocks for s in b.init_stds]
  np.testing.assert_allclose(stds, expected, rtol=0.05)
  assert all(float(jnp.abs(layer.bias[...]).max()) == 0 for b in model.blocks for layer in b.layers())


def test_caffe_cifar_port_averages_in_pool2():
  model = models.create_model("nin_cifar10", pool2="avg")
  names = [r.name for r in models.summarize(model)]
  assert "pool1 (max 3x3/2)" in names and "pool2 (avg 3x3/2)" in names


def test_num_classes_changes_only_the_last_layer():
  model = models.create_model("nin_cifar10", num_classes=100)
  assert models.count_params(model) == EXPECTED_PARAMS["nin_cifar100"]


def test_gap_logits_are_the_spatial_mean_of_the_last_maps():
  model = models.create_model("nin_cifar10")
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  captured = {}
  logits = model(x, hook=lambda name, y, m: captured.__setitem__(name, y))
  last_maps = captured["cccp6"]
  assert last_maps.shape == (3, 8, 8, 10)
  np.testing.assert_allclose(logits, last_maps.mean(axis=(1, 2)), rtol=1e-6, atol=1e-7)


def test_fc_and_gap_heads_share_the_body():
  gap = models.create_model("nin_cifar10", head="gap", rngs=nnx.Rngs(3))
  fc = models.create_model("nin_cifar10", head="fc_dropout", rngs=nnx.Rngs(3))
  body_gap, body_fc = nnx.state(gap.blocks, nnx.Param), nnx.state(fc.blocks, nnx.Param)
  assert jax.tree.structure(body_gap) == jax.tree.structure(body_fc)
  jax.tree.map(np.testing.assert_array_equal, body_gap, body_fc)
  # The FC head adds exactly one Linear over the flattened 8x8x10 maps.
  assert models.count_params(fc) - models.count_params(gap) == 8 * 8 * 10 * 10 + 10


def test_dropout_is_active_in_training_and_off_in_evaluation():
  model = models.create_model("nin_cifar10", head="fc_dropout")
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  eval_a, eval_b = model(x), model(x, train=False, dropout_key=jax.random.key(1))
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = model(x, train=True, dropout_key=jax.random.key(1))
  train_b = model(x, train=True, dropout_key=jax.random.key(2))
  np.testing.assert_array_equal(train_a, model(x, train=True, dropout_key=jax.random.key(1)))
  assert not np.allclose(train_a, train_b)
  assert not np.allclose(train_a, eval_a)
  with pytest.raises(ValueError, match="dropout_key"):
    model(x, train=True)


def test_bfloat16_compute_stays_close_to_float32():
  f32 = models.create_model("nin_cifar10", rngs=nnx.Rngs(0))
  bf16 = models.create_model("nin_cifar10", dtype="bfloat16", rngs=nnx.Rngs(0))
  # Parameters stay float32; only the computation runs in bfloat16.
  assert {p.dtype for p in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  a, b = f32(x), bf16(x)
  assert b.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) < 0.05
  assert float(jnp.mean(jnp.abs(a - b)) / jnp.mean(jnp.abs(a))) < 0.02


def test_forward_sharded_over_8_devices_equals_unsharded():
  assert jax.device_count() == 8, "conftest.py sets 8 virtual CPU devices"
  model = models.create_model("nin_cifar10", rngs=nnx.Rngs(0))
  x = np.asarray(jax.random.normal(jax.random.key(0), (16, 32, 32, 3)))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))

  single = np.asarray(forward(jax.device_put(state, jax.devices()[0]), x))

  mesh = Mesh(np.array(jax.devices()), ("data",))
  state_r = jax.device_put(state, NamedSharding(mesh, P()))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  sharded = forward(state_r, x_sharded)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), single, rtol=1e-5, atol=1e-6)


def test_readme_models_table_is_generated_from_the_code():
  readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
  section = re.search(r"<!-- models:begin -->\n(.*?)\n<!-- models:end -->", readme, re.S)
  assert section, "README.md lacks the generated Models table markers"
  assert section.group(1).strip() == models.models_markdown(), (
    "README Models table is stale: regenerate with `python -m nin_jax.model.models --markdown`"
  )


def test_module_runs_as_a_script():
  out = subprocess.run(
    [sys.executable, "-m", "nin_jax.model.models", "nin_cifar10"], capture_output=True, text=True, check=True
  ).stdout
  assert out.splitlines()[-2] == "total parameters: 966,986"


def test_dropout_rate_can_be_replaced():
  spec = models.get_spec("nin_imagenet", dropout=0.2)
  assert [b.dropout for b in spec.blocks] == [0.0, 0.0, 0.2, 0.0]  # Only after pool3, as in Caffe.
  model = models.create_model("nin_cifar10", dropout=0.0)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  np.testing.assert_array_equal(model(x), model(x, train=True, dropout_key=jax.random.key(1)))
  with pytest.raises(ValueError, match="dropout must be in"):
    models.get_spec("nin_cifar10", dropout=1.0)


_GRADIENTS_SCRIPT = """
import sys
import numpy as np
if sys.argv[1] == "fast":
  from nin_jax.main import use_fast_cpu_fusions
  use_fast_cpu_fusions()
import jax, optax
from flax import nnx
from nin_jax.model import models
graph, params = nnx.split(models.create_model("nin_mnist", rngs=nnx.Rngs(0)), nnx.Param)
rng = np.random.default_rng(0)
x, y = rng.normal(size=(8, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 8)
def loss(p):
  logits = nnx.merge(graph, p)(x, train=True, dropout_key=jax.random.key(0))
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
value, grads = jax.jit(jax.value_and_grad(loss))(params)
np.savez(sys.argv[2], value, *jax.tree.leaves(grads))
"""


@pytest.mark.slow
def test_fast_cpu_fusions_match_the_plain_path(tmp_path):
  """The YNNPACK fusions main.py turns on for speed change only the summation order (on XLA's
  own kernels, which runs over several CPU devices keep: see tests/test_onednn.py)."""
  env = one_device_env(NIN_JAX_ONEDNN="0")
  results = {}
  for path in ("plain", "fast"):
    subprocess.run(
      [sys.executable, "-c", _GRADIENTS_SCRIPT, path, str(tmp_path / path)], env=env, check=True, capture_output=True
    )
    with np.load(tmp_path / f"{path}.npz") as arrays:
      results[path] = [arrays[k] for k in arrays.files]
  (plain_loss, *plain), (fast_loss, *fast) = results["plain"], results["fast"]
  np.testing.assert_allclose(fast_loss, plain_loss, rtol=1e-6)
  errors = [np.abs(f - p).max() / np.abs(p).max() for f, p in zip(fast, plain)]
  assert len(errors) == 18
  # Measured 1.3e-6. Not 0: the fast subprocess really ran other kernels.
  assert 0 < max(errors) < 1e-5
