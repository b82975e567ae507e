"""Each NIN layer, relu(conv(x, w) + b), and each max pool as oneDNN calls on CPU.

XLA:CPU runs convolutions through Eigen and 1x1 layers as dots; in this project's training
step both ran at 1/2-2/3 of the speed of oneDNN, the library PyTorch's CPU convolutions
use, on AVX-512 CPUs (on an AVX2-only Zen 3 the step gained 4-22% over two runs). So on
CPU every layer of an mlpconv block goes through `native/onednn_conv.cc`: XLA FFI handlers
for the forward pass with bias and ReLU fused, and for the backward passes (data; weights
and bias), joined by a custom VJP; the 1x1 layers are 1x1 convolutions there. Max pools go
through oneDNN's pooling, whose backward pass reads which input won from the forward's
workspace. In float32, results differ from the plain XLA path by rounding only (another
summation order; pools are exact).

In bfloat16 (config dtype; the parameters stay float32) each layer accumulates in float32
and rounds its result to bfloat16. Whether oneDNN's bfloat16 kernels are faster than its
float32 ones is a property of the CPU that ISA names did not predict (AMX: the nin_mnist
step 2.4x faster than float32; AVX512-BF16 on a Zen 4 EPYC: 2.2-2.4x faster too, on a Xeon
capped to the same ISA: slower; AVX2 only: not implemented), so `dtype_probe` times one
layer both ways on the CPU at hand. Where the native kernels lose, a bfloat16 layer runs on
the float32 kernels instead: the products of two bfloat16 numbers are exact in float32, so
that computes the same function up to summation order, at float32's speed rather than at
XLA:CPU's bfloat16 speed (~0.7x of float32). `tests/test_onednn.py` bounds both per layer
geometry and per model. Measured speeds: docs/performance.md.

The path is taken where it is a plain win: a CPU job with one device in all. GPUs and TPUs
keep XLA's kernels, and so do CPU runs sharded over several devices, as XLA cannot
partition a custom call. Where the library cannot be built or loaded (`onednn_build`: no
compiler, no oneDNN, not x86-64 Linux), training runs on XLA's own kernels after one
warning line. NIN_JAX_ONEDNN=0 turns it off.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from nin_jax.model import onednn_build

SWITCH = "NIN_JAX_ONEDNN"
Unavailable = onednn_build.Unavailable
# FFI targets, and the handler symbol of each in the library.
_FORWARD = "nin_conv_relu_forward"
_BACKWARD_DATA = "nin_conv_backward_data"
_BACKWARD_WEIGHTS = "nin_conv_backward_weights"
_MAX_POOL = "nin_max_pool_forward"
_MAX_POOL_BACKWARD = "nin_max_pool_backward"
_HANDLERS = {
  _FORWARD: "NinConvReluForward",
  _BACKWARD_DATA: "NinConvBackwardData",
  _BACKWARD_WEIGHTS: "NinConvBackwardWeights",
  _MAX_POOL: "NinMaxPoolForward",
  _MAX_POOL_BACKWARD: "NinMaxPoolBackward",
}
_lock = threading.Lock()


def usable_cpus() -> int:
  """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota.

  OpenMP sizes its teams from the affinity mask alone, which a container's quota (e.g. 4
  CPUs' worth of time on a 64-core host) does not narrow: 64 spinning threads then share
  the time of 4.
  """
  count = _affinity()
  quota = _cgroup_quota(Path("/sys/fs/cgroup"))
  return max(1, min(count, math.ceil(quota))) if quota else count


def _affinity() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cgroup_quota(root: Path) -> float | None:
  """CPUs' worth of time a cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`) quota allows; None if unlimited."""
  try:
    if (root / "cpu.max").exists():
      limit, period = (root / "cpu.max").read_text().split()[:2]
      return None if limit == "max" else int(limit) / int(period)
    limit = int((root / "cpu/cpu.cfs_quota_us").read_text())
    period = int((root / "cpu/cpu.cfs_period_us").read_text())
    return None if limit <= 0 else limit / period
  except (OSError, ValueError):
    return None


def _load() -> str | None:
  """Builds, loads and registers the handlers once; the reason it could not, or None."""
  with _lock:
    if not _loaded:
      _loaded.append(_build_and_register())
    return _loaded[0]


_loaded: list[str | None] = []  # after the first _load(): [None], or [why it failed]
library_name: list[str] = []  # after a successful _load(): the library's file name


def _build_and_register() -> str | None:
  try:
    library = onednn_build.load()
  except Unavailable as error:
    return str(error)
  for target, symbol in _HANDLERS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  # Only where a quota narrows the affinity mask (OpenMP's own default) and the user set no count.
  if "OMP_NUM_THREADS" not in os.environ and usable_cpus() < _affinity():
    library.NinSetThreads(usable_cpus())
  library_name.append(Path(library._name).name)  # pylint: disable=protected-access
  return None


def enabled() -> bool:
  """Whether layers traced now run through oneDNN (see the module docstring)."""
  if os.environ.get(SWITCH, "1") == "0" or jax.default_backend() != "cpu" or jax.device_count() != 1:
    return False
  reason = _load()
  if reason is not None:
    _warn_once(reason)
  return reason is None


def used_for(dtype) -> bool:
  """Whether a model computing in `dtype` runs its layers on oneDNN here (float32 or bfloat16)."""
  return jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16) and enabled()


def max_pool_used_for(window: int, dtype) -> bool:
  """Whether a window x window max pool of `dtype` runs on oneDNN here. Its workspace, which
  `_max_pool` declares as one byte per output, holds bytes only below 256 window elements."""
  return window * window < 256 and used_for(dtype)


@functools.cache
def _warn_once(reason: str) -> None:
  logging.warning("oneDNN layers unavailable, using XLA's kernels (slower on CPU): %s.", reason)


def _geometry(strides: tuple[int, int], padding) -> dict[str, np.int64]:
  (pad_top, pad_bottom), (pad_left, pad_right) = padding
  values = dict(
    stride_h=strides[0],
    stride_w=strides[1],
    pad_top=pad_top,
    pad_bottom=pad_bottom,
    pad_left=pad_left,
    pad_right=pad_right,
  )
  return {name: np.int64(value) for name, value in values.items()}


def _output_shape(x_shape, kernel: tuple[int, int], strides, padding, channels: int) -> tuple[int, ...]:
  """NHWC output shape of a window sliding over `x_shape` (floor rounding, as XLA and Caffe)."""
  n, h, w, _ = x_shape
  sizes = [(size + sum(pads) - k) // s + 1 for size, k, s, pads in zip((h, w), kernel, strides, padding)]
  return (n, *sizes, channels)


def _ffi(target: str, *results: jax.ShapeDtypeStruct):
  reason = _load()
  if reason is not None:
    raise Unavailable(reason)
  return jax.ffi.ffi_call(target, results if len(results) > 1 else results[0], vmap_method="sequential")


def conv_relu(
  x: jax.Array,
  w: jax.Array,
  b: jax.Array,
  strides: tuple[int, int],
  padding: tuple[tuple[int, int], tuple[int, int]],
  *,
  float32_kernels: bool,
) -> jax.Array:
  """relu(conv(x, w) + b) for NHWC images and an HWIO kernel, in one oneDNN call; x, w and b
  share one dtype, float32 or bfloat16 (accumulated in float32 either way). `float32_kernels`:
  bfloat16 operands run on the float32 kernels (`dtype_probe.float32_kernels_for`: where the
  native ones are slower or absent). Required: a caller that forgot it asked an AVX2 CPU for
  bfloat16 kernels it does not have, and oneDNN refused."""
  if float32_kernels and x.dtype == jnp.bfloat16:
    f32 = jnp.float32
    return native_conv_relu(x.astype(f32), w.astype(f32), b.astype(f32), strides, padding).astype(x.dtype)
  return native_conv_relu(x, w, b, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def native_conv_relu(x, w, b, strides, padding):
  """`conv_relu` on the kernels of x's own dtype, whatever `dtype_probe` measured."""
  _check_layer(x, w, b, strides, padding)
  y = jax.ShapeDtypeStruct(_output_shape(x.shape, w.shape[:2], strides, padding, w.shape[3]), x.dtype)
  return _ffi(_FORWARD, y)(x, w, b, **_geometry(strides, padding))


def _check_layer(x, w, b, strides, padding) -> None:
  """The shapes one layer needs, as a Python error (the handler checks them again)."""
  if x.ndim != 4 or w.ndim != 4 or b.shape != w.shape[-1:] or x.shape[-1] != w.shape[2]:
    raise ValueError(
      f"conv_relu needs NHWC images, an HWIO kernel whose input channels are the images' "
      f"and a bias per output channel; got images {x.shape}, kernel {w.shape}, bias {b.shape}"
    )
  if min(strides) < 1 or min(p for pair in padding for p in pair) < 0:
    raise ValueError(f"conv_relu needs strides >= 1 and padding >= 0; got {strides} and {padding}")
  if not x.dtype == w.dtype == b.dtype or x.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(
      f"conv_relu needs images, kernel and bias all float32 or all bfloat16; got {x.dtype}, {w.dtype} and {b.dtype}"
    )


def _conv_relu_forward(x, w, b, strides, padding):
  y = native_conv_relu(x, w, b, strides, padding)
  return y, (x, w, y)


def _conv_relu_backward(strides, padding, residuals, dy):
  x, w, y = residuals
  dz = jnp.where(y > 0, dy, 0.0)  # ReLU's gradient, 0 at 0 as in Caffe and jax.nn.relu.
  geometry = _geometry(strides, padding)
  # The first layer's input gradient is unused: XLA removes that call as dead code.
  dx = _ffi(_BACKWARD_DATA, jax.ShapeDtypeStruct(x.shape, x.dtype))(dz, w, **geometry)
  # The bias shares the kernel's dtype (the handlers take one dtype per call) and has its width.
  dw, db = _ffi(_BACKWARD_WEIGHTS, jax.ShapeDtypeStruct(w.shape, w.dtype), jax.ShapeDtypeStruct(w.shape[-1:], w.dtype))(
    x, dz, **geometry
  )
  return dx, dw, db


native_conv_relu.defvjp(_conv_relu_forward, _conv_relu_backward)


def max_pool(
  x: jax.Array,
  window: int,
  stride: int,
  padding: tuple[tuple[int, int], tuple[int, int]],
  *,
  float32_kernels: bool,
) -> jax.Array:
  """A window x window max pool of float32 or bfloat16 NHWC images, in oneDNN; padding never wins.
  Exact in either dtype, so bfloat16 runs on the float32 kernels wherever its layers do."""
  if float32_kernels and x.dtype == jnp.bfloat16:
    return _max_pool(x.astype(jnp.float32), window, stride, padding, x.shape).astype(x.dtype)
  return _max_pool(x, window, stride, padding, x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, stride, padding, shape):
  return _max_pool_call(x, window, stride, padding, shape, training=False)[0]


def _pool_attributes(window, stride, padding) -> dict[str, np.int64]:
  return {"window": np.int64(window), **_geometry((stride, stride), padding)}


def _max_pool_forward(x, window, stride, padding, shape):
  return _max_pool_call(x, window, stride, padding, shape, training=True)


def _max_pool_call(x, window, stride, padding, shape, training: bool):
  out = _output_shape(shape, (window, window), (stride, stride), padding, shape[3])
  # The workspace says which input each output took: one byte per output (see max_pool_used_for).
  call = _ffi(_MAX_POOL, jax.ShapeDtypeStruct(out, x.dtype), jax.ShapeDtypeStruct(out, jnp.uint8))
  return call(x, training=np.int64(training), **_pool_attributes(window, stride, padding))


def _max_pool_backward(window, stride, padding, shape, workspace, dy):
  dx = jax.ShapeDtypeStruct(shape, dy.dtype)
  return (_ffi(_MAX_POOL_BACKWARD, dx)(dy, workspace, **_pool_attributes(window, stride, padding)),)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)
