"""The oneDNN layers (nin_jax/model/onednn.py) against XLA's plain ones, how they are built, and how they fail.

The test session has 8 virtual devices, where the trainer keeps XLA's kernels; these tests
call the oneDNN layer directly, switch it on for one unsharded model, or run the trainer in
a one-device subprocess as a CPU user would.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

from nin_jax.model import dtype_probe, layers, models, onednn, onednn_build
from tests.helpers import (
  ROOT,
  flat_params,
  needs_fmnist,
  one_device_env,
  resume_config,
  run_main,
  run_main_until,
  write_config_file,
)

# Only where the layers cannot exist. On x86-64 Linux with the oneDNN wheels a build or load
# failure fails these tests (first of all the next one), so a broken build cannot pass CI green.
pytestmark = pytest.mark.skipif(
  not onednn_build.expected_here(), reason=onednn_build.supported_platform() or "the oneDNN wheels are not installed"
)


def test_the_library_builds_and_loads_here():
  assert onednn._load() is None


# (batch, size, in, out, kernel, strides, padding): every kind of layer the variants have, an
# 11x11/4 first layer, 5x5 and 3x3 padded ones, 1x1 layers, and uneven strides and padding.
GEOMETRIES = [
  *(
    pytest.param(*g, marks=pytest.mark.slow)
    for g in [
      (2, 227, 3, 96, 11, (4, 4), ((0, 0), (0, 0))),
      (3, 14, 48, 128, 5, (1, 1), ((2, 2), (2, 2))),
      (2, 13, 256, 384, 3, (1, 1), ((1, 1), (1, 1))),
      (4, 28, 96, 64, 1, (1, 1), ((0, 0), (0, 0))),
    ]
  ),
  (2, 9, 5, 7, 3, (2, 1), ((0, 1), (2, 0))),  # Uneven strides and padding: the quick tier's one.
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
  got, fused_vjp = jax.vjp(
    jax.jit(lambda x, w, b: onednn.conv_relu(x, w, b, strides, padding, float32_kernels=False)), x, w, b
  )
  assert got.shape == want.shape
  assert 0.2 < float(jnp.mean(want > 0)) < 0.8  # The ReLU's mask matters in the gradients below.
  assert _relative_error(got, want) < 1e-5
  dy = jax.random.normal(keys[3], want.shape)
  for name, g, h in zip("xwb", fused_vjp(dy), plain_vjp(dy)):
    assert _relative_error(g, h) < 1e-5, name  # Measured up to 3e-6: summation order only.


@pytest.mark.slow
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
  graph, params = nnx.split(models.create_model(name, image_size=size, dtype=dtype, rngs=nnx.Rngs(0)), nnx.Param)
  spec = models.get_spec(name)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, size, size, spec.in_channels)).astype(np.float32)
  labels = rng.integers(0, spec.num_classes, 2)

  def loss(p):
    logits = nnx.merge(graph, p)(x, train=True, dropout_key=jax.random.key(0))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return jax.jit(jax.value_and_grad(loss)), params


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("nin_mnist", 28), ("nin_cifar10", 32), ("nin_svhn", 32), ("nin_imagenet", 224)])
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


def _timing(float32_ms, bfloat16_ms, kernels="onednn"):
  return dtype_probe.Timing(kernels, float32_ms, bfloat16_ms, "a test CPU")


@pytest.mark.parametrize("bfloat16_ms,native", [(10.0, True), (10.9, True), (11.2, False), (None, False)])
def test_bfloat16_layers_take_the_native_kernels_only_where_they_measured_faster(bfloat16_ms, native, monkeypatch):
  """Float32 takes 10 ms in each case; bfloat16 counts as slower past 1.1x, or with no kernel."""
  monkeypatch.setattr(onednn, "enabled", lambda: True)
  monkeypatch.setattr(dtype_probe, "timing", lambda kernels: _timing(10.0, bfloat16_ms))
  model = models.create_model("nin_mnist", dtype="bfloat16")
  hlo = jax.jit(lambda x: model(x)).lower(jnp.zeros((1, 28, 28, 1))).as_text().splitlines()
  calls = [line for line in hlo if "custom_call @nin_" in line]
  assert sum("@nin_conv_relu_forward" in line for line in calls) == 9
  assert sum("@nin_max_pool_forward" in line for line in calls) == 2
  operand = "xbf16>" if native else "xf32>"
  assert all(operand in line.split("->")[0] for line in calls), calls[0]


@pytest.mark.parametrize(
  "kernels,timing,advised",
  [
    ("xla", (10.0, 12.0), True),
    ("xla", (10.0, 10.5), False),
    ("xla", (10.0, 5.0), False),
    ("onednn", (10.0, None), True),
    ("onednn", (10.0, 30.0), True),
    ("onednn", (10.0, 4.0), False),
  ],
)
def test_a_bfloat16_cpu_run_is_advised_float32_only_where_it_measured_faster(kernels, timing, advised, monkeypatch):
  """Where bfloat16 is no faster on the run's kernels (none: oneDNN on AVX2), float32 is advised."""
  monkeypatch.setattr(dtype_probe, "kernels_here", lambda: kernels)
  monkeypatch.setattr(dtype_probe, "timing", lambda k: _timing(*timing, kernels=k))
  advice = dtype_probe.slow_dtype_advice("bfloat16", "cpu")
  assert (advice is not None) == advised
  assert advice is None or advice.endswith("--config.dtype=float32 trains faster here.")
  assert dtype_probe.slow_dtype_advice("float32", "cpu") is None
  assert dtype_probe.slow_dtype_advice("bfloat16", "tpu") is None


def test_the_advice_here_is_what_the_probe_measures_here(monkeypatch):
  """The real probe on this CPU, both kernels: a bfloat16 time exists unless oneDNN has no such
  kernel here, and the advice follows the measured ratio."""
  for kernels in ("onednn", "xla"):
    measured = dtype_probe.measure(kernels)
    assert measured.kernels == kernels and 0.1 < measured.float32_ms < 2000
    assert measured.bfloat16_ms is None or 0.1 < measured.bfloat16_ms < 5000
    assert kernels == "onednn" or measured.bfloat16_ms is not None  # XLA has bfloat16 everywhere.
    monkeypatch.setattr(dtype_probe, "kernels_here", lambda kernels=kernels: kernels)
    monkeypatch.setattr(dtype_probe, "timing", lambda k, measured=measured: measured)
    slower = measured.bfloat16_ms is None or measured.bfloat16_ms > dtype_probe.SLOWER * measured.float32_ms
    assert (dtype_probe.slow_dtype_advice("bfloat16", "cpu") is not None) == slower


def test_the_probe_takes_each_dtypes_fastest_run_so_a_busy_machine_does_not_flip_it():
  """A stand-in layer: 10 ms in float32; 4 ms in bfloat16 except on 3 calls of 5, which a
  concurrent process stretches to 30 ms (as oneDNN's bfloat16 calls were on a Zen 4 beside a
  `pip install`). The medians say bfloat16 is slower; the fastest runs say what the layer costs."""
  calls = {"bfloat16": 0}

  def layer(x, *_):
    if x.dtype == jnp.bfloat16:
      calls["bfloat16"] += 1
      time.sleep(0.030 if calls["bfloat16"] % 5 < 3 else 0.004)
    else:
      time.sleep(0.010)
    return x

  measured = dtype_probe._measure(layer, "xla")
  assert 10.0 <= measured.float32_ms < 15.0 and 4.0 <= measured.bfloat16_ms < 9.0
  assert not measured.bfloat16_slower


def test_again_measures_anew_in_place_of_the_cached_verdict(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(onednn_build.CACHE_DIR, str(tmp_path))
  monkeypatch.setattr(onednn, "enabled", lambda: False)
  dtype_probe.timing.cache_clear()
  verdicts = iter([_timing(10.0, 30.0, "xla"), _timing(10.0, 5.0, "xla")])  # Busy at first, then quiet.
  monkeypatch.setattr(dtype_probe, "measure", lambda k: next(verdicts))
  assert dtype_probe.main([]) == 0 and dtype_probe.main([]) == 0  # The second run reads the cache.
  assert dtype_probe.main(["--again"]) == 0 and dtype_probe.main([]) == 0
  lines = [json.loads(line)["bfloat16_ms"] for line in capsys.readouterr().out.splitlines()]
  assert lines == [30.0, 30.0, 5.0, 5.0]
  dtype_probe.timing.cache_clear()


def test_the_probe_is_cached_per_cpu_and_refuses_a_file_others_may_write(tmp_path, monkeypatch):
  monkeypatch.setenv(onednn_build.CACHE_DIR, str(tmp_path))
  dtype_probe.timing.cache_clear()
  measurements = []
  monkeypatch.setattr(dtype_probe, "measure", lambda k: measurements.append(k) or _timing(10.0, 5.0, k))
  assert dtype_probe.timing("xla").bfloat16_ms == 5.0 and measurements == ["xla"]
  [cached] = tmp_path.glob("dtype-speed-*.json")
  dtype_probe.timing.cache_clear()
  assert dtype_probe.timing("xla").bfloat16_ms == 5.0 and measurements == ["xla"]  # Read, not measured.
  cached.write_text(json.dumps({**json.loads(cached.read_text()), "bfloat16_ms": 1.0}))
  cached.chmod(0o666)  # Another user could have written it: measured anew, not believed.
  dtype_probe.timing.cache_clear()
  assert dtype_probe.timing("xla").bfloat16_ms == 5.0 and measurements == ["xla", "xla"]
  dtype_probe.timing.cache_clear()


def test_the_cpu_name_tells_isas_apart():
  name = dtype_probe.cpu_name()
  assert "[isa " in name and not name.startswith("unknown")


def _operands(keys, batch, size, cin, cout, k, dtype):
  x = jax.random.normal(keys[0], (batch, size, size, cin)).astype(dtype)
  w = (jax.random.normal(keys[1], (k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(dtype)
  b = (0.1 * jax.random.normal(keys[2], (cout,))).astype(dtype)
  return x, w, b


def _native_bfloat16_here() -> bool:
  return onednn._load() is None and dtype_probe.measure("onednn").bfloat16_ms is not None


# bfloat16 layers run on oneDNN's own bfloat16 kernels, or on its float32 ones (see onednn.py).
BFLOAT16_KERNELS = [
  pytest.param(
    True,
    id="native",
    marks=pytest.mark.skipif("not _native_bfloat16_here()", reason="oneDNN has no bfloat16 kernels on this CPU"),
  ),
  pytest.param(False, id="float32-math"),
]


@pytest.mark.slow
@pytest.mark.parametrize("native", BFLOAT16_KERNELS)
@pytest.mark.parametrize("batch,size,cin,cout,k,strides,padding", GEOMETRIES)
def test_bfloat16_layer_is_float32_math_rounded_to_bfloat16(
  batch, size, cin, cout, k, strides, padding, native, monkeypatch
):
  """On bfloat16 operands oneDNN accumulates in float32 and rounds at the end: its forward and
  gradients are the float32 computation on the same values to within bfloat16's rounding
  (2^-8 = 3.9e-3 relative, two roundings at most; measured 1.5e-3 to 3.2e-3 of the largest)."""
  keys = jax.random.split(jax.random.key(0), 4)
  x, w, b = _operands(keys, batch, size, cin, cout, k, jnp.bfloat16)

  def plain(x, w, b):  # float32 throughout, on the bfloat16 values
    y = lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST
    )
    return jax.nn.relu(y + b)

  f32 = [a.astype(jnp.float32) for a in (x, w, b)]
  want, plain_vjp = jax.vjp(plain, *f32)
  got, fused_vjp = jax.vjp(
    jax.jit(lambda x, w, b: onednn.conv_relu(x, w, b, strides, padding, float32_kernels=not native)), x, w, b
  )
  assert got.dtype == jnp.bfloat16 and got.shape == want.shape
  assert _relative_error(got.astype(jnp.float32), want) < 8e-3
  dy = jax.random.normal(keys[3], want.shape).astype(jnp.bfloat16)
  for name, g, h in zip("xwb", fused_vjp(dy), plain_vjp(dy.astype(jnp.float32))):
    assert g.dtype == jnp.bfloat16, name
    assert _relative_error(g.astype(jnp.float32), h) < 8e-3, name


@pytest.mark.slow
@pytest.mark.parametrize("native", BFLOAT16_KERNELS)
@pytest.mark.parametrize("name,size", [("nin_mnist", 28), ("nin_cifar10", 32)])
def test_bfloat16_model_is_as_close_to_float32_on_onednn_as_on_xla(name, size, native, monkeypatch):
  """Mixed precision (bfloat16 layers, float32 parameters) on oneDNN differs from float32 no
  more than XLA's own bfloat16 computation does (median gradient error over the parameters,
  measured with native kernels on an AMX Xeon: nin_mnist 0.068 against XLA's 0.066,
  nin_cifar10 0.054 against 0.068)."""
  monkeypatch.setattr(dtype_probe, "onednn_bfloat16_native", lambda: native)
  gradients = {}
  for dtype, use in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
    monkeypatch.setattr(onednn, "enabled", lambda use=use: use)
    step, params = _loss_and_gradients(name, size, dtype)
    assert ("nin_conv_relu_forward" in str(jax.make_jaxpr(step)(params))) == use
    gradients[dtype, use] = jax.tree.leaves(step(params)[1])

  def median_error(dtype, use):
    return float(
      np.median(
        [
          jnp.linalg.norm(g - h) / jnp.linalg.norm(h)
          for g, h in zip(gradients[dtype, use], gradients["float32", False])
        ]
      )
    )

  onednn_error, xla_error = median_error("bfloat16", True), median_error("bfloat16", False)
  assert 0 < onednn_error <= 1.1 * xla_error, (onednn_error, xla_error)


@pytest.mark.slow
@needs_fmnist
def test_one_device_run_on_onednn_resumes_bitwise(tmp_path):
  """A CPU user's run (one device: the oneDNN layers) killed and resumed equals one straight run."""
  config = resume_config()
  config_file = write_config_file(tmp_path, config)
  straight = run_main(["--config", config_file, "--workdir", str(tmp_path / "straight")], env=one_device_env())
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


@pytest.mark.slow
def test_without_a_compiler_training_keeps_xla_after_one_warning(tmp_path):
  script = (
    "from nin_jax.model import onednn, models; import jax.numpy as jnp; "
    "m = models.create_model('nin_mnist'); print(onednn.enabled(), m(jnp.ones((1, 28, 28, 1))).shape)"
  )
  done = subprocess.run(
    [sys.executable, "-c", script],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env=one_device_env(NIN_JAX_CACHE_DIR=str(tmp_path), CXX="/nonexistent/c++"),
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ["False", "(1,", "10)"]
  warnings = [line for line in done.stderr.splitlines() if "oneDNN layers unavailable" in line]
  assert len(warnings) == 1 and "C++ compiler '/nonexistent/c++' not found" in warnings[0]
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_the_library_is_built_once_and_atomically(tmp_path, monkeypatch):
  monkeypatch.setenv(onednn_build.CACHE_DIR, str(tmp_path / "cache"))
  onednn_build.load()
  [library] = (tmp_path / "cache").iterdir()  # No partial file left behind.
  built = library.stat().st_mtime_ns
  onednn_build.load()
  assert library.stat().st_mtime_ns == built
  assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700 and library.stat().st_mode & 0o077 == 0


def test_the_cache_key_holds_the_onednn_version(monkeypatch):
  path, _, version = onednn_build.library_path()
  monkeypatch.setattr(onednn_build, "onednn_version", lambda prefix: version + 1)
  assert onednn_build.library_path()[0] != path


def _broken_source(tmp_path, monkeypatch):
  source = tmp_path / "onednn_conv.cc"
  text = onednn_build.SOURCE.read_text().replace("int64_t OutputSize(", "int64_t OutputSize(undeclared_t ", 1)
  source.write_text(text)
  monkeypatch.setattr(onednn_build, "SOURCE", source)
  monkeypatch.setenv(onednn_build.CACHE_DIR, str(tmp_path / "cache"))


def test_a_broken_source_fails_the_build_with_its_error_line(tmp_path, monkeypatch, capsys):
  _broken_source(tmp_path, monkeypatch)
  with pytest.raises(onednn_build.Unavailable, match=r"compiling onednn_conv.cc failed: .*error: .*undeclared_t"):
    onednn_build.load()
  assert onednn_build.main() == 1  # What `bash setup.sh` runs: set-up, and so CI, fail here.
  err = capsys.readouterr().err
  assert "error:" in err and "python -m nin_jax.model.onednn_build" in err
  assert os.listdir(tmp_path / "cache") == []  # No partial file left behind.


def test_a_library_someone_else_could_have_planted_is_never_loaded(tmp_path, monkeypatch):
  assert onednn._load() is None  # Built in the default cache; a copy saves a compilation.
  built = onednn_build.library_path()[0]
  monkeypatch.setenv(onednn_build.CACHE_DIR, str(tmp_path / "cache"))
  library = onednn_build.cache_dir() / built.name
  shutil.copyfile(built, library)
  os.chmod(library, 0o777)  # Group and others may write it.
  with pytest.raises(onednn_build.Unavailable, match="others may write it"):
    onednn_build.load()
  os.chmod(library, 0o700)
  os.chown(library, 65534, -1)  # Another user's (the tests run as root where CI does).
  if os.stat(library).st_uid == 65534:
    with pytest.raises(onednn_build.Unavailable, match="belongs to uid 65534"):
      onednn_build.load()
  os.chown(tmp_path / "cache", 65534, -1)
  if os.stat(tmp_path / "cache").st_uid == 65534:
    with pytest.raises(onednn_build.Unavailable, match="refusing the cache directory"):
      onednn_build.load()


@pytest.mark.slow
def test_a_stale_library_is_rebuilt_once(tmp_path, monkeypatch):
  monkeypatch.setenv(onednn_build.CACHE_DIR, str(tmp_path / "cache"))
  library, _, _ = onednn_build.library_path()
  library.write_bytes(b"not a shared library")  # A truncated build, or one for another oneDNN.
  library.chmod(0o700)
  assert onednn_build.load().NinOneDnnVersion() == onednn_build.onednn_version(onednn_build.onednn_prefix())
  assert library.read_bytes()[:4] == b"\x7fELF"


def test_shapes_that_do_not_make_a_layer_are_python_errors_and_handler_errors():
  x, w, b = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 6)), jnp.ones((6,))
  with pytest.raises(ValueError, match="a bias per output channel"):
    onednn.conv_relu(x, w, jnp.ones((5,)), (1, 1), ((0, 0), (0, 0)), float32_kernels=False)
  with pytest.raises(ValueError, match="input channels"):
    onednn.conv_relu(jnp.ones((1, 8, 8, 3)), w, b, (1, 1), ((0, 0), (0, 0)), float32_kernels=False)
  with pytest.raises(ValueError, match="all float32 or all bfloat16"):
    onednn.conv_relu(x, w.astype(jnp.bfloat16), b, (1, 1), ((0, 0), (0, 0)), float32_kernels=False)
  # Past the Python check, the handler refuses a bias of the wrong width instead of reading past it.
  call = onednn._ffi(onednn._FORWARD, jax.ShapeDtypeStruct((1, 6, 6, 6), jnp.float32))
  with pytest.raises(jax.errors.JaxRuntimeError, match="one element per output channel"):
    jax.block_until_ready(call(x, w, jnp.ones((5,)), **onednn._geometry((1, 1), ((0, 0), (0, 0)))))
  call = onednn._ffi(onednn._FORWARD, jax.ShapeDtypeStruct((1, 7, 6, 6), jnp.float32))
  with pytest.raises(jax.errors.JaxRuntimeError, match="height or width"):
    jax.block_until_ready(call(x, w, b, **onednn._geometry((1, 1), ((0, 0), (0, 0)))))


@pytest.mark.parametrize(
  "files,quota",
  [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ({"cpu/cpu.cfs_quota_us": "400000", "cpu/cpu.cfs_period_us": "100000"}, 4.0),
    ({}, None),
  ],
)
def test_a_cgroup_cpu_quota_caps_the_threads(files, quota, tmp_path):
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text(text)
  assert onednn._cgroup_quota(tmp_path) == quota
  assert 1 <= onednn.usable_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_benchmark_runs_on_the_onednn_layers_in_either_dtype(dtype):
  """As a CPU user runs it (one device). Its matmul peak once asked an AVX2 CPU for oneDNN's
  bfloat16 kernels, which it does not have, and the benchmark died before measuring."""
  done = subprocess.run(
    [sys.executable, "-m", "nin_jax.benchmark", "--model", "nin_mnist", "--batch_size", "8", "--dtype", dtype]
    + ["--steps", "1", "--repeats", "1", "--warmup", "0"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=one_device_env(),
  )
  assert done.returncode == 0, done.stderr[-2000:]
  rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
  assert [(r["measure"], r["dtype"], r["layers"]) for r in rows] == [
    (m, dtype, "onednn") for m in ("train_step", "eval_step")
  ]
  assert all(r["matmul_peak_flops_per_sec"] > 0 for r in rows)
