"""Keeps the memory a CPU training step frees for the next step, instead of returning it to the OS.

XLA:CPU allocates each step's temporaries as one block from one of its worker threads and frees
it when the step ends (nin_imagenet, batch 32, bfloat16: 154,415,104 bytes). glibc serves a
block above 32 MiB from a worker thread's arena with mmap and unmaps it on free, so each step
faults every page of it in anew, and the kernel zeroes each one: strace showed one mmap and
one munmap of that size per step, and getrusage 37,700 minor faults per step. With every thread
on glibc's main arena, no mmap and no trimming, the block is reused from step to step: no
faults once the heap has grown. On an AMD EPYC Zen 4 (2 cores, nothing else running) that made
nin_imagenet's bfloat16 step ~9% faster (oneDNN's calls in it 465 instead of 534 ms) and
nin_cifar10's (batch 128) ~17% (2,130 against 2,500 ms per 5 steps).

Its price: a resident set that stays at its peak (nin_imagenet +0.5 GB, nin_cifar10 +0.4-0.8 GB;
flat over 250 steps), and one malloc lock for all threads, which made the default recipe's
small step (nin_mnist, batch 32, bfloat16, whose temporaries stay below 32 MiB and never
faulted) 2-3% slower: 1,142 against 1,180 img/s, best repeats, medians of seven alternating pairs. So it is
set only for a step whose activations (`models.activation_bytes`; XLA's temporaries measured
~1.3x that) pass `WORTH_IT`, and only where JAX can compute on the CPU alone: no accelerator
plugin installed, or JAX_PLATFORMS=cpu. NIN_JAX_KEEP_MEMORY=0 turns it off, =1 on for any step.

In a process that already runs threads (a Jupyter kernel) `mallopt` comes too late: glibc
fixes its limit on arenas when a thread first allocates, so XLA's threads still get arenas of
their own. A step with a 64 MiB temporary then faulted 32,770-81,925 pages in 5 calls (3 once,
when XLA took the block from the main arena), against 0 in a fresh process (81,930 without
it), and the head ablation's step in a papermill kernel trained ~1,000 img/s per core instead
of ~1,300 (AMX Xeon). The same settings given as
`GLIBC_TUNABLES` when the process starts hold for every thread (3 faults):
`GLIBC_TUNABLES=$(python -m nin_jax.host_memory) papermill ...`.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

SWITCH = "NIN_JAX_KEEP_MEMORY"
WORTH_IT = 24 * 2**20  # bytes of activations: temporaries of ~32 MiB, where glibc starts to map blocks
# Every thread on the main arena, no mmap, never trim: (tunable name, mallopt parameter of malloc.h, value).
_SETTINGS = (("arena_max", -8, 1), ("mmap_max", -4, 0), ("trim_threshold", -1, -1))
_ACCELERATOR_MODULES = ("libtpu", "jax_plugins")  # libtpu; the namespace of JAX's GPU plugins
# The same settings for a process's start (glibc's tunables take sizes unsigned: -1 is the largest).
TUNABLES = ":".join(f"glibc.malloc.{name}={value % 2**64}" for name, _, value in _SETTINGS)


def keep_for(config) -> bool:
  """`keep_freed_memory()` if a train step of `config` is big enough to gain (see above); whether
  it did. Call it before JAX starts its threads: a thread that has already allocated keeps its
  own arena."""
  from nin_jax.model import models  # pylint: disable=g-import-not-at-top

  try:
    spec = models.get_spec(config.model)
    step = models.activation_bytes(spec, config.image_size or spec.image_size, config.batch_size, config.dtype)
  except (ValueError, AttributeError, KeyError):  # no such model or key: the trainer says so
    return False
  if os.environ.get(SWITCH) != "1" and step < WORTH_IT:
    return False
  return keep_freed_memory()


def keep_freed_memory() -> bool:
  """Sets glibc's allocator to reuse freed memory (see the module docstring); whether it did."""
  if os.environ.get(SWITCH, "1") == "0" or not cpu_only() or platform.libc_ver()[0] != "glibc":
    return False
  if TUNABLES in os.environ.get("GLIBC_TUNABLES", ""):
    return True  # Set when the process started: every thread has them.
  mallopt = ctypes.CDLL(None).mallopt
  if not all(mallopt(parameter, value) == 1 for _, parameter, value in _SETTINGS):
    return False
  threads = threads_running()
  if threads > 1:
    print(
      f"nin_jax: this process already runs {threads} threads, too late to set glibc to keep the memory a "
      "step frees (the head ablation's steps ran 22% slower so on an AMX Xeon); start it with "
      "GLIBC_TUNABLES=$(python -m nin_jax.host_memory)",
      file=sys.stderr,
    )
    return False
  return True


def threads_running() -> int:
  """Threads of this process (1 where Linux's /proc cannot say)."""
  try:
    return len(os.listdir("/proc/self/task"))
  except OSError:
    return 1


def cpu_only() -> bool:
  """Whether JAX will compute on the CPU alone: JAX_PLATFORMS says so, or no TPU or GPU plugin is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return {name.strip() for name in platforms.split(",")} == {"cpu"}
  if any(importlib.util.find_spec(module) for module in _ACCELERATOR_MODULES):
    return False
  return not importlib.metadata.entry_points(group="jax_plugins")


if __name__ == "__main__":
  print(TUNABLES)  # For GLIBC_TUNABLES=$(python -m nin_jax.host_memory) before a Jupyter kernel or papermill.
