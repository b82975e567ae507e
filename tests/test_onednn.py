"""The oneDNN layers (nin_jax/onednn.py) against XLA's plain ones, and how they fail soft.

The test session has 8 virtual devices, where the trainer keeps XLA's kernels; these tests
call the oneDNN layer directly, switch it on for one unsharded model, or run the trainer in
a one-device subprocess as a CPU user would.
"""

import os
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

from nin_jax import layers, models, onednn, train
from tests.helpers import (ROOT, flat_params, needs_fmnist, one_device_env, resume_config, run_main,
                           run_main_until, write_config_file)

pytestmark = pytest.mark.skipif(onednn._load() is not None, reason=f"oneDNN unavailable: {onednn._load()}")

# (batch, size, in, out, kernel, strides, padding): every kind of layer the variants have, an
# 11x11/4 first layer, 5x5 and 3x3 padded ones, 1x1 layers, and uneven strides and padding.
GEOMETRIES = [
    (2, 227, 3, 96, 11, (4, 4), ((0, 0), (0, 0))),
    (3, 14, 48, 128, 5, (1, 1), ((2, 2), (2, 2))),
    (2, 13, 256, 384, 3, (1, 1), ((1, 1), (1, 1))),
    (4, 28, 96, 64, 1, (1, 1), ((0, 0), (0, 0))),
    (2, 9, 5, 7, 3, (2, 1), ((0, 1), (2, 0))),
]


def _relative_error(a, b) -> float:
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize("batch,size,cin,cout,k,strides,padding", GEOMETRIES)
def test_layer_and_its_gradients_equal_xla(batch, size, cin, cout, k, strides, padding):
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (batch, size, size, cin))
  w = jax.random.normal(keys[1], (k, k, cin, cout)) / np.sqrt(k * k * cin)
  b = 0.1 * jax.random.normal(keys[2], (cout,))

  def plain(x, w, b):
    y = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + b)

  want, plain_vjp = jax.vjp(plain, x, w, b)
  got, fused_vjp = jax.vjp(jax.jit(lambda x, w, b: onednn.conv_relu(x, w, b, strides, padding)), x, w, b)
  assert got.shape == want.shape
  assert 0.2 < float(jnp.mean(want > 0)) < 0.8  # The ReLU's mask matters in the gradients below.
  assert _relative_error(got, want) < 1e-5
  dy = jax.random.normal(keys[3], want.shape)
  for name, g, h in zip("xwb", fused_vjp(dy), plain_vjp(dy)):
    assert _relative_error(g, h) < 1e-5, name  # Measured up to 3e-6: summation order only.


@pytest.mark.parametrize("size", [54, 32, 28, 13, 7])  # Caffe's rounding up adds a window at 54, 32 and 28.
def test_max_pool_and_its_gradient_equal_xla(size, monkeypatch):
  x = jax.random.normal(jax.random.key(size), (3, size, size, 8))  # No ties: one max per window.
  results = {}
  for use in (False, True):
    monkeypatch.setattr(onednn, "enabled", lambda use=use: use)
    pool = jax.jit(lambda x: layers.pool2d(x, "max", window=3, stride=2))
    assert ("nin_max_pool_forward" in str(jax.make_jaxpr(pool)(x))) == use
    y, vjp = jax.vjp(pool, x)
    results[use] = y, vjp(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))[0]
  np.testing.assert_array_equal(results[True][0], results[False][0])
  np.testing.assert_array_equal(results[True][1], results[False][1])  # Each gradient lands on the max.


def _loss_and_gradients(name, size, dtype="float32"):
  graph, params = nnx.split(models.create_model(name, image_size=size, dtype=dtype, rngs=nnx.Rngs(0)),
                            nnx.Param)
  spec = models.get_spec(name)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, size, size, spec.in_channels)).astype(np.float32)
  labels = rng.integers(0, spec.num_classes, 2)

  def loss(p):
    logits = nnx.merge(graph, p)(x, train=True, dropout_key=jax.random.key(0))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return jax.jit(jax.value_and_grad(loss)), params


@pytest.mark.parametrize("name,size", [("nin_mnist", 28), ("nin_cifar10", 32), ("nin_svhn", 32),
                                       ("nin_imagenet", 224)])
def test_every_variant_trains_the_same_with_onednn_layers(name, size, monkeypatch):
  results = {}
  for use in (False, True):
    monkeypatch.setattr(onednn, "enabled", lambda use=use: use)
    step, params = _loss_and_gradients(name, size)
    targets = str(jax.make_jaxpr(step)(params))
    assert ("nin_conv_relu_forward" in targets) == use and ("nin_max_pool_forward" in targets) == use
    results[use] = step(params)
  (plain_loss, plain), (fused_loss, fused) = results[False], results[True]
  np.testing.assert_allclose(fused_loss, plain_loss, rtol=1e-6)
  errors = [_relative_error(f, p) for f, p in zip(jax.tree.leaves(fused), jax.tree.leaves(plain))]
  assert len(errors) == 2 * sum(len(b.features) for b in models.get_spec(name).blocks)
  assert 0 < max(errors) < 2e-5  # Measured up to 2.7e-6; 0 would mean one path ran twice.


@pytest.mark.parametrize("dtype,support,fused", [
    ("bfloat16", onednn.BFLOAT16_AMX, True), ("bfloat16", onednn.BFLOAT16_AVX512, True),
    ("bfloat16", 0, False), (jnp.float16, onednn.BFLOAT16_AMX, False)])
def test_low_precision_layers_take_onednn_where_the_cpu_multiplies_bfloat16(dtype, support, fused, monkeypatch):
  monkeypatch.setattr(onednn, "enabled", lambda: True)
  monkeypatch.setattr(onednn, "_bfloat16_support", [support])
  model = models.create_model("nin_mnist", dtype=dtype)
  targets = str(jax.make_jaxpr(lambda x: model(x))(jnp.zeros((1, 28, 28, 1))))
  assert ("nin_conv_relu_forward" in targets) == fused and ("nin_max_pool_forward" in targets) == fused


@pytest.mark.parametrize("dtype,platform,support,advised", [
    ("bfloat16", "cpu", onednn.BFLOAT16_AMX, False), ("bfloat16", "cpu", onednn.BFLOAT16_AVX512, True),
    ("bfloat16", "cpu", 0, True), ("float32", "cpu", 0, False), ("bfloat16", "tpu", 0, False)])
def test_a_bfloat16_cpu_run_without_amx_is_told_that_float32_is_faster(dtype, platform, support, advised,
                                                                        monkeypatch):
  monkeypatch.setattr(onednn, "bfloat16_support", lambda: support)
  job = types.SimpleNamespace(config=types.SimpleNamespace(dtype=dtype),
                              devices=[types.SimpleNamespace(platform=platform)])
  advice = train._slow_dtype_advice(job)
  assert (advice is not None) == advised
  assert advice is None or advice.endswith("--config.dtype=float32 trains faster here.")


needs_native_bfloat16 = pytest.mark.skipif(
    not onednn._bfloat16_support or onednn._bfloat16_support[0] < onednn.BFLOAT16_AVX512,
    reason="this CPU has neither AMX nor AVX512-BF16")


@needs_native_bfloat16
@pytest.mark.parametrize("batch,size,cin,cout,k,strides,padding", GEOMETRIES)
def test_bfloat16_layer_is_float32_math_rounded_to_bfloat16(batch, size, cin, cout, k, strides, padding):
  """On bfloat16 operands oneDNN accumulates in float32 and rounds at the end: its forward and
  gradients are the float32 computation on the same values to within bfloat16's rounding
  (2^-8 = 3.9e-3 relative, two roundings at most; measured 1.5e-3 to 3.2e-3 of the largest)."""
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (batch, size, size, cin)).astype(jnp.bfloat16)
  w = (jax.random.normal(keys[1], (k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(jnp.bfloat16)
  b = (0.1 * jax.random.normal(keys[2], (cout,))).astype(jnp.bfloat16)

  def plain(x, w, b):  # float32 throughout, on the bfloat16 values
    y = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=lax.Precision.HIGHEST)
    return jax.nn.relu(y + b)

  f32 = [a.astype(jnp.float32) for a in (x, w, b)]
  want, plain_vjp = jax.vjp(plain, *f32)
  got, fused_vjp = jax.vjp(jax.jit(lambda x, w, b: onednn.conv_relu(x, w, b, strides, padding)), x, w, b)
  assert got.dtype == jnp.bfloat16 and got.shape == want.shape
  assert _relative_error(got.astype(jnp.float32), want) < 8e-3
  dy = jax.random.normal(keys[3], want.shape).astype(jnp.bfloat16)
  for name, g, h in zip("xwb", fused_vjp(dy), plain_vjp(dy.astype(jnp.float32))):
    assert g.dtype == jnp.bfloat16, name
    assert _relative_error(g.astype(jnp.float32), h) < 8e-3, name


@needs_native_bfloat16
@pytest.mark.parametrize("name,size", [("nin_mnist", 28), ("nin_cifar10", 32)])
def test_bfloat16_model_is_as_close_to_float32_on_onednn_as_on_xla(name, size, monkeypatch):
  """Mixed precision (bfloat16 layers, float32 parameters) on oneDNN differs from float32 no
  more than XLA's own bfloat16 computation does (median gradient error over the parameters,
  measured: nin_mnist 0.068 against XLA's 0.066, nin_cifar10 0.054 against 0.068)."""
  gradients = {}
  for dtype, use in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
    monkeypatch.setattr(onednn, "enabled", lambda use=use: use)
    step, params = _loss_and_gradients(name, size, dtype)
    assert ("nin_conv_relu_forward" in str(jax.make_jaxpr(step)(params))) == use
    gradients[dtype, use] = jax.tree.leaves(step(params)[1])

  def median_error(dtype, use):
    return float(np.median([jnp.linalg.norm(g - h) / jnp.linalg.norm(h) for g, h in
                            zip(gradients[dtype, use], gradients["float32", False])]))

  onednn_error, xla_error = median_error("bfloat16", True), median_error("bfloat16", False)
  assert 0 < onednn_error <= 1.1 * xla_error, (onednn_error, xla_error)


@needs_fmnist
def test_one_device_run_on_onednn_resumes_bitwise(tmp_path):
  """A CPU user's run (one device: the oneDNN layers) killed and resumed equals one straight run."""
  config = resume_config()
  config_file = write_config_file(tmp_path, config)
  straight = run_main(["--config", config_file, "--workdir", str(tmp_path / "straight")],
                      env=one_device_env())
  out, err = straight.communicate(timeout=300)
  assert straight.returncode == 0, err
  assert "1 cpu device(s), 1 host(s), layers on oneDNN" in out

  workdir = str(tmp_path / "resumed")
  code, _, err = run_main_until(["--config", config_file, "--workdir", workdir], "step 6/16", env=one_device_env())
  assert code == 128 + signal.SIGTERM, err
  resumed = run_main(["--config", config_file, "--workdir", workdir], env=one_device_env())
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err
  assert "resumed from the checkpoint at step" in out
  a, b = flat_params(tmp_path / "straight", config), flat_params(workdir, config)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # Bitwise.


def test_without_a_compiler_training_keeps_xla_after_one_warning(tmp_path):
  script = ("from nin_jax import onednn, models; import jax.numpy as jnp; "
            "m = models.create_model('nin_mnist'); print(onednn.enabled(), m(jnp.ones((1, 28, 28, 1))).shape)")
  done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=one_device_env(NIN_JAX_CACHE_DIR=str(tmp_path), CXX="/nonexistent/c++"))
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ["False", "(1,", "10)"]
  warnings = [line for line in done.stderr.splitlines() if "oneDNN layers unavailable" in line]
  assert len(warnings) == 1 and "C++ compiler '/nonexistent/c++' not found" in warnings[0]
  assert os.listdir(tmp_path) == []


def test_the_library_is_built_once_and_atomically(tmp_path, monkeypatch):
  monkeypatch.setenv(onednn.CACHE_DIR, str(tmp_path))
  library = onednn.build_library()
  built = library.stat().st_mtime_ns
  assert onednn.build_library() == library and library.stat().st_mtime_ns == built
  assert os.listdir(tmp_path) == [library.name]  # No partial file left behind.
