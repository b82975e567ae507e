"""Each NIN layer, relu(conv(x, w) + b), and each max pool as oneDNN calls on CPU.

XLA:CPU runs convolutions through Eigen and 1x1 layers as dots; in this project's training
step both ran at 1/2-2/3 of the speed of oneDNN, the library PyTorch's CPU convolutions
use (Eigen's backward passes, and the dots of the 1x1 layers, which XLA:CPU ran on one
thread). So on CPU every layer of an mlpconv block goes through `native/onednn_conv.cc`:
XLA FFI handlers for the forward pass with bias and ReLU fused, and for the backward passes
(data; weights and bias), joined by a custom VJP; the 1x1 layers are 1x1 convolutions
there. Max pools go through oneDNN's pooling, whose backward pass reads which input won
from the forward's workspace. In float32, results differ from the plain XLA path by
rounding only (another summation order; pools are exact). In bfloat16 (config dtype; the
parameters stay float32) oneDNN multiplies on AMX tiles where the CPU has them: the
nin_mnist step ran 2.4x faster than in float32 on a 2-core Xeon, and 5x faster than
XLA:CPU's own bfloat16 step; each layer accumulates in float32 and rounds its result to
bfloat16. `tests/test_onednn.py` bounds both per layer geometry and per model. Measured
speeds (train step, same session): the README's Performance section.

The handlers are compiled with the system C++ compiler against the `onednn-cpu-gomp`
wheels of requirements.txt and jaxlib's FFI headers, once per source and jaxlib version,
into `$NIN_JAX_CACHE_DIR` (default ~/.cache/nin_jax; ~5 s). Where that cannot happen (no
compiler, no oneDNN, not x86-64 Linux), training runs on XLA's own kernels after one
warning line. The path is taken where it is a plain win: a CPU job with one device in
all, float32 layers, or bfloat16 ones on a CPU that multiplies bfloat16 natively
(`bfloat16_support`). GPUs and TPUs keep XLA's kernels, and so do CPU runs sharded over
several devices, as XLA cannot partition a custom call. NIN_JAX_ONEDNN=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import site
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

SWITCH = "NIN_JAX_ONEDNN"
CACHE_DIR = "NIN_JAX_CACHE_DIR"
SOURCE = Path(__file__).with_name("native") / "onednn_conv.cc"
# FFI targets, and the handler symbol of each in the library.
_FORWARD = "nin_conv_relu_forward"
_BACKWARD_DATA = "nin_conv_backward_data"
_BACKWARD_WEIGHTS = "nin_conv_backward_weights"
_MAX_POOL = "nin_max_pool_forward"
_MAX_POOL_BACKWARD = "nin_max_pool_backward"
BFLOAT16_AVX512, BFLOAT16_AMX = 1, 2  # bfloat16_support() levels
_HANDLERS = {_FORWARD: "NinConvReluForward", _BACKWARD_DATA: "NinConvBackwardData",
             _BACKWARD_WEIGHTS: "NinConvBackwardWeights", _MAX_POOL: "NinMaxPoolForward",
             _MAX_POOL_BACKWARD: "NinMaxPoolBackward"}
_lock = threading.Lock()


class Unavailable(RuntimeError):
  """Why the oneDNN library cannot be built or loaded here."""


def _onednn_prefix() -> Path:
  """The install prefix whose include/ and lib/ hold the oneDNN wheels' files."""
  for prefix in (sys.prefix, site.getuserbase()):
    files = (Path(prefix) / "include/oneapi/dnnl/dnnl.hpp", Path(prefix) / "lib/libdnnl.so")
    if all(f.exists() for f in files):
      return Path(prefix)
  raise Unavailable("oneDNN is not installed (pip install -r requirements.txt brings it on x86-64 Linux)")


def _cache_dir() -> Path:
  configured = os.environ.get(CACHE_DIR)
  if configured:
    return Path(configured)
  home_cache = Path.home() / ".cache" / "nin_jax"
  try:
    home_cache.mkdir(parents=True, exist_ok=True)
    return home_cache
  except OSError:
    return Path(tempfile.gettempdir()) / "nin_jax"


def build_library() -> Path:
  """Compiles the handler once per source, jaxlib and oneDNN; returns the shared library.

  The name carries a hash of everything that goes into the build, so a changed source or
  upgraded jaxlib builds anew, and the file appears by an atomic rename, so processes that
  start together never load a half-written library.
  """
  prefix = _onednn_prefix()
  wanted = os.environ.get("CXX")
  compiler = shutil.which(wanted) if wanted else shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    raise Unavailable(f"C++ compiler {wanted!r} not found" if wanted
                      else "no C++ compiler (install g++ or set CXX)")
  recipe = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
            f"-I{prefix / 'include'}", str(SOURCE), f"-L{prefix / 'lib'}", "-ldnnl",
            f"-Wl,-rpath,{prefix / 'lib'}"]
  digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([jaxlib.__version__, *recipe]).encode())
  library = _cache_dir() / f"onednn_conv-{digest.hexdigest()[:16]}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  partial = library.with_name(f"{library.name}.{os.getpid()}.partial")
  done = subprocess.run([*recipe, "-o", str(partial)], capture_output=True, text=True, check=False)
  if done.returncode != 0:
    partial.unlink(missing_ok=True)
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise Unavailable(f"compiling {SOURCE.name} failed: {last}")
  os.replace(partial, library)
  return library


_loaded: list[str | None] = []  # after the first _load(): [None], or [why it failed]
_bfloat16_support: list[int] = []  # after a successful _load(): [NinBfloat16Support()]


def _load() -> str | None:
  """Builds, loads and registers the handlers once; the reason it could not, or None."""
  with _lock:
    if not _loaded:
      _loaded.append(_build_and_register())
    return _loaded[0]


def _build_and_register() -> str | None:
  if sys.platform != "linux" or os.uname().machine != "x86_64":
    return f"oneDNN wheels exist for x86-64 Linux only, not {sys.platform}/{os.uname().machine}"
  try:
    library = ctypes.cdll.LoadLibrary(str(build_library()))
    for target, symbol in _HANDLERS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  except (Unavailable, OSError) as error:
    return str(error)
  _bfloat16_support.append(library.NinBfloat16Support())
  return None


def enabled() -> bool:
  """Whether layers traced now run through oneDNN (see the module docstring)."""
  if os.environ.get(SWITCH, "1") == "0" or jax.default_backend() != "cpu" or jax.device_count() != 1:
    return False
  reason = _load()
  if reason is not None:
    _warn_once(reason)
  return reason is None


def bfloat16_support() -> int:
  """How oneDNN multiplies bfloat16 on this CPU: `BFLOAT16_AMX` (tiles: the NIN step ~2.4x
  faster than in float32), `BFLOAT16_AVX512` (dot-product instructions: convolutions at about
  half their float32 speed), else 0 (emulated), and 0 wherever `enabled()` is false."""
  return _bfloat16_support[0] if enabled() else 0


def used_for(dtype) -> bool:
  """Whether a model computing in `dtype` runs its layers on oneDNN here: float32, and
  bfloat16 on CPUs that multiply it natively (XLA:CPU's bfloat16 step is ~5x slower)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return enabled()
  return dtype == jnp.bfloat16 and bfloat16_support() >= BFLOAT16_AVX512


def max_pool_used_for(window: int, dtype) -> bool:
  """Whether a window x window max pool of `dtype` runs on oneDNN here. Its workspace, which
  `_max_pool` declares as one byte per output, holds bytes only below 256 window elements."""
  return window * window < 256 and used_for(dtype)


@functools.cache
def _warn_once(reason: str) -> None:
  logging.warning("oneDNN layers unavailable, using XLA's kernels (slower on CPU): %s.", reason)


def _geometry(strides: tuple[int, int], padding) -> dict[str, np.int64]:
  (pad_top, pad_bottom), (pad_left, pad_right) = padding
  values = dict(stride_h=strides[0], stride_w=strides[1], pad_top=pad_top, pad_bottom=pad_bottom,
                pad_left=pad_left, pad_right=pad_right)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv_relu(x: jax.Array, w: jax.Array, b: jax.Array, strides: tuple[int, int],
              padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """relu(conv(x, w) + b) for NHWC images and an HWIO kernel, in one oneDNN call; x, w and b
  share one dtype, float32 or bfloat16 (accumulated in float32 either way)."""
  y = jax.ShapeDtypeStruct(_output_shape(x.shape, w.shape[:2], strides, padding, w.shape[3]), x.dtype)
  return _ffi(_FORWARD, y)(x, w, b, **_geometry(strides, padding))


def _conv_relu_forward(x, w, b, strides, padding):
  y = conv_relu(x, w, b, strides, padding)
  return y, (x, w, y)


def _conv_relu_backward(strides, padding, residuals, dy):
  x, w, y = residuals
  dz = jnp.where(y > 0, dy, 0.0)  # ReLU's gradient, 0 at 0 as in Caffe and jax.nn.relu.
  geometry = _geometry(strides, padding)
  # The first layer's input gradient is unused: XLA removes that call as dead code.
  dx = _ffi(_BACKWARD_DATA, jax.ShapeDtypeStruct(x.shape, x.dtype))(dz, w, **geometry)
  # The bias shares the kernel's dtype (the handlers take one dtype per call) and has its width.
  dw, db = _ffi(_BACKWARD_WEIGHTS, jax.ShapeDtypeStruct(w.shape, w.dtype),
                jax.ShapeDtypeStruct(w.shape[-1:], w.dtype))(x, dz, **geometry)
  return dx, dw, db


conv_relu.defvjp(_conv_relu_forward, _conv_relu_backward)


def max_pool(x: jax.Array, window: int, stride: int,
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """A window x window max pool of float32 or bfloat16 NHWC images, in oneDNN; padding never wins."""
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
