"""Which compute dtype is faster on this CPU, measured rather than read off ISA names.

`python -m nin_jax.model.dtype_probe` prints the measurement. The rule it replaces ("bfloat16 is
slow without AMX") came from a Xeon capped to AVX512-BF16 and was wrong by 2.4x on a Zen 4
EPYC with the same instructions, so the decision is a timing: one NIN layer (nin_mnist's
second 5x5 convolution and the 1x1 layer after it, batch 8), forward and backward,
alternately in float32 and bfloat16, on the kernels a run would use (oneDNN's where
`onednn.enabled()`, else XLA's). Each dtype's time is the fastest of its repeats, not the
median: another process on the same cores only ever adds time, and it adds more to
oneDNN's bfloat16 calls, whose OpenMP threads then wait for one another (on a Zen 4 EPYC
under a concurrent `pip install` the medians were 71.5 ms in bfloat16 against 29.0 in
float32, the wrong way round; quiet, 7.0 against 12.5). A verdict of "slower" is measured
a second time before it is believed, because it sends a run to the float32 kernels. The result is cached per CPU (model
name and ISA flags: under a hypervisor a Zen 3 and a Zen 4 may both be "AMD EPYC"), kernel
library and JAX version, in the private cache directory of `onednn_build`, so only the
first run on a machine spends the ~2 s (`bash setup.sh` takes it; `--again` measures anew).

It decides two things: whether oneDNN's native bfloat16 kernels are used at all
(`onednn_bfloat16_native`; else a bfloat16 layer runs on the float32 kernels, see
nin_jax/model/onednn.py), and whether a bfloat16 run is told that float32 trains faster here
(`slow_dtype_advice`): wherever bfloat16 measured no faster on the kernels the run uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import socket
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nin_jax.model import onednn, onednn_build

# The layer timed: nin_mnist's block 2 (5x5, 96 -> 128 channels at 14x14) and its first 1x1.
_BATCH, _SIZE, _IN, _OUT, _KERNEL = 8, 14, 96, 128, 5
_REPEATS = 15
# A dtype counts as slower only past this ratio: the probe's own run-to-run noise on a shared
# 2-core VM was up to ~5%.
SLOWER = 1.10


@dataclasses.dataclass(frozen=True)
class Timing:
  """Milliseconds of one layer's forward and backward pass per dtype; bfloat16_ms is None
  where the kernels have no bfloat16 implementation on this CPU."""

  kernels: str  # "onednn" or "xla"
  float32_ms: float
  bfloat16_ms: float | None
  cpu: str

  @property
  def bfloat16_slower(self) -> bool:
    return self.bfloat16_ms is None or self.bfloat16_ms > SLOWER * self.float32_ms


def cpu_name() -> str:
  """The CPU's model name and a digest of its ISA flags (what makes two 'AMD EPYC' differ)."""
  model, flags = "unknown CPU", ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as info:
      for line in info:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = value.strip()
  except OSError:
    pass
  return f"{model} [isa {hashlib.sha256(flags.encode()).hexdigest()[:8]}]"


def _layer(conv_relu):
  """One layer's forward and backward pass through `conv_relu(x, w, b, strides, padding)`."""

  def loss(x, w5, b5, w1, b1):
    h = conv_relu(x, w5, b5, (1, 1), ((2, 2), (2, 2)))
    return jnp.sum(conv_relu(h, w1, b1, (1, 1), ((0, 0), (0, 0))).astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def _xla_conv_relu(x, w, b, strides, padding):
  """A layer as the model writes it on XLA's kernels: a 1x1 layer is a dot over the channels
  (nnx.Linear, nin_jax/model/layers.py), not a convolution."""
  if w.shape[:2] == (1, 1):
    return jax.nn.relu(jnp.dot(x, w[0, 0]) + b)
  y = jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(y + b)


def _operands(dtype):
  rng = np.random.default_rng(0)
  shapes = [(_BATCH, _SIZE, _SIZE, _IN), (_KERNEL, _KERNEL, _IN, _OUT), (_OUT,), (1, 1, _OUT, _IN), (_IN,)]
  return [jnp.asarray(0.05 * rng.standard_normal(shape), dtype) for shape in shapes]


def measure(kernels: str) -> Timing:
  """Times the layer in both dtypes on `kernels` ("onednn": native kernels of each dtype)."""
  with jax.ensure_compile_time_eval():  # Also when first asked while a model is being traced.
    return _measure(_layer(onednn.native_conv_relu if kernels == "onednn" else _xla_conv_relu), kernels)


def _measure(step, kernels: str) -> Timing:
  runs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    operands = _operands(dtype)
    try:
      jax.block_until_ready(step(*operands))
    except jax.errors.JaxRuntimeError:  # oneDNN has no such kernel on this CPU (e.g. bfloat16 on AVX2).
      continue
    runs[dtype] = functools.partial(step, *operands)
  fastest = _fastest(runs)
  result = Timing(kernels, fastest[jnp.float32], fastest.get(jnp.bfloat16), cpu_name())
  if result.bfloat16_ms is None or not result.bfloat16_slower:
    return result
  again = _fastest(runs)  # A second look before a costly verdict: each dtype's fastest of both.
  return Timing(kernels, *(min(fastest[dtype], again[dtype]) for dtype in (jnp.float32, jnp.bfloat16)), cpu_name())


def _fastest(runs) -> dict:
  """Each dtype's fastest of `_REPEATS` runs, alternating so that neither gets the quieter moments."""
  times = {dtype: [] for dtype in runs}
  for _ in range(_REPEATS):
    for dtype, run in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(run())
      times[dtype].append(1e3 * (time.perf_counter() - start))
  return {dtype: min(ms) for dtype, ms in times.items()}


def _cache_file(kernels: str):
  library = onednn.library_name[0] if kernels == "onednn" else "xla"
  # XLA's kernels are slower unoptimised (as the tests run them): never one measurement for both.
  optimised = not jax.config.read("jax_disable_most_optimizations")
  key = f"{cpu_name()}|{library}|jax {jax.__version__}|optimised {optimised}|{_BATCH},{_SIZE},{_IN},{_OUT},{_KERNEL}"
  return onednn_build.cache_dir() / f"dtype-speed-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


@functools.cache
def timing(kernels: str) -> Timing:
  """The cached measurement for this CPU and `kernels`, measured now if there is none."""
  try:
    path = _cache_file(kernels)
    if path.exists():
      onednn_build.check_private(path, "the cached measurement")
      return Timing(**json.loads(path.read_text()))
  except (onednn_build.Unavailable, OSError, ValueError, TypeError):
    path = None  # Unreadable or not ours: measure, and keep the result in memory only.
  result = measure(kernels)
  if path is not None:
    partial = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.partial")
    try:
      partial.write_text(json.dumps(dataclasses.asdict(result)))
      os.replace(partial, path)  # Whole or absent, for processes reading it meanwhile.
    except OSError:  # A read-only cache: measured again next time, nothing lost.
      partial.unlink(missing_ok=True)
  return result


def kernels_here() -> str:
  return "onednn" if onednn.enabled() else "xla"


def onednn_bfloat16_native() -> bool:
  """Whether oneDNN's own bfloat16 kernels beat its float32 ones on this CPU."""
  return not timing("onednn").bfloat16_slower


def float32_kernels_for(dtype) -> bool:
  """Whether oneDNN layers of `dtype` run on its float32 kernels: bfloat16 where the native ones lose."""
  return jnp.dtype(dtype) == jnp.bfloat16 and not onednn_bfloat16_native()


def bfloat16_kernels() -> str:
  """Which kernels a bfloat16 layer runs on here, for the run's description line."""
  if kernels_here() == "xla":
    return "XLA's kernels"
  return (
    "oneDNN's bfloat16 kernels"
    if onednn_bfloat16_native()
    else "oneDNN's float32 kernels (its bfloat16 ones measured slower here, or are absent)"
  )


def slow_dtype_advice(dtype, platform: str) -> str | None:
  """A line for a bfloat16 CPU run where bfloat16 measured no faster than float32; else None.

  On oneDNN such a run's layers already take the float32 kernels, but it still pays for the
  conversions around each layer (the nin_mnist step ran ~10% slower than in float32 on an
  AVX2-only EPYC); on XLA's kernels bfloat16 itself is slower (~0.7x there).
  """
  if jnp.dtype(dtype) != jnp.bfloat16 or platform != "cpu":
    return None
  kernels = kernels_here()
  measured = timing(kernels)
  if not measured.bfloat16_slower:
    return None
  where = "oneDNN" if kernels == "onednn" else "XLA's kernels (several CPU devices, or oneDNN off)"
  took = f"took {measured.float32_ms:.1f} ms in float32"
  took += (
    f" and {measured.bfloat16_ms:.1f} ms in bfloat16"
    if measured.bfloat16_ms
    else ", and oneDNN has no bfloat16 kernel for it"
  )
  return (
    f"note: on this CPU ({measured.cpu}) a NIN layer on {where} {took} (measured once and cached; "
    f"`python -m nin_jax.model.dtype_probe --again` on a quiet machine measures anew); "
    f"--config.dtype=float32 trains faster here."
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description="Which compute dtype is faster on this CPU (one JSON line per kernel library)."
  )
  parser.add_argument("--again", action="store_true", help="discard the cached measurement and measure anew")
  args = parser.parse_args(argv)
  for kernels in ("onednn", "xla") if onednn.enabled() else ("xla",):
    if args.again:
      _cache_file(kernels).unlink(missing_ok=True)
      timing.cache_clear()
    print(json.dumps(dataclasses.asdict(timing(kernels))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
