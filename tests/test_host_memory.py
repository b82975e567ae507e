"""The allocator setting that lets a CPU step reuse the memory the last step freed (nin_jax/host_memory.py)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from nin_jax import host_memory

_MIB = 64  # Above glibc's largest mmap threshold (32 MiB): without the setting, each step maps it anew.
# A jitted step with a 64 MiB temporary (XLA allocates it per call and frees it at the end) and a
# scalar result: the minor page faults of 5 calls after 3 warm-up calls.
_FAULTS_OF_FIVE_STEPS = f"""
import resource, sys, threading
if "--thread-first" in sys.argv:  # as in a Jupyter kernel: a thread has allocated, and runs on
  allocating = threading.Thread(target=lambda: [bytearray(2**20) for _ in range(3)])
  allocating.start(); allocating.join()  # done before mallopt: glibc's arena limit is fixed by then
  threading.Thread(target=threading.Event().wait, daemon=True).start()
from nin_jax import host_memory
print(host_memory.keep_freed_memory())  # before JAX starts, as the entry points do
import jax, jax.numpy as jnp
x = jnp.ones(({_MIB} * 256, 256), jnp.float32)
w, w2 = jnp.full((256, 1024), 1 / 256), jnp.ones((1024, 16))
step = jax.jit(lambda x: (jnp.maximum(x @ w, 0.5) @ w2).sum())  # x @ w: the temporary
for _ in range(3):
  step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  step(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: str, *args: str, **env_vars: str) -> tuple[int, str, str]:
  """The faults of five steps, whether keep_freed_memory() said it took, and its stderr."""
  env = {**os.environ, host_memory.SWITCH: keep, "JAX_PLATFORMS": "cpu", **env_vars}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a plain run has
  out = subprocess.run(
    [sys.executable, "-c", _FAULTS_OF_FIVE_STEPS, *args], env=env, capture_output=True, text=True, check=True
  )
  took, faults = out.stdout.split()[-2:]
  return int(faults), took, out.stderr


_LINUX_WITHOUT_HUGE_PAGES = (
  pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator and Linux's page faults"),
  pytest.mark.skipif(
    "[always]" in (Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text() if sys.platform == "linux" else ""),
    reason="transparent huge pages for every mapping: 512 times fewer faults either way",
  ),
)


@_LINUX_WITHOUT_HUGE_PAGES[0]
@_LINUX_WITHOUT_HUGE_PAGES[1]
def test_a_steps_temporary_is_reused_instead_of_faulted_in_again():
  pages_per_step = _MIB * 2**20 // os.sysconf("SC_PAGE_SIZE")
  without, _, _ = _faults("0")
  kept, took, _ = _faults("1")
  # Measured on the Zen 4: 81,926 faults without (every page of every step) and 0 with the setting.
  assert without >= 4 * pages_per_step, without
  assert kept <= pages_per_step // 10 and took == "True", kept


@_LINUX_WITHOUT_HUGE_PAGES[0]
@_LINUX_WITHOUT_HUGE_PAGES[1]
def test_a_process_with_threads_is_told_to_set_it_when_it_starts():
  pages_per_step = _MIB * 2**20 // os.sysconf("SC_PAGE_SIZE")
  _, took, said = _faults("1", "--thread-first")
  # Its faults are not asserted: they depend on which thread XLA allocates from (AMX Xeon:
  # 32,770 to 81,925 in five steps, and 3 once, when the block came from the main arena).
  assert took == "False"
  assert "too late to set glibc" in said and "start it with GLIBC_TUNABLES=$(python -m nin_jax.host_memory)\n" in said
  tunables = subprocess.run(
    [sys.executable, "-m", "nin_jax.host_memory"], capture_output=True, text=True, check=True
  ).stdout.strip()
  kept, took, said = _faults("1", "--thread-first", GLIBC_TUNABLES=tunables)
  assert kept <= pages_per_step // 10 and took == "True" and "too late" not in said, (kept, said)  # 3 measured


def test_it_applies_only_where_jax_computes_on_the_cpu_alone(monkeypatch):
  for platforms, expected in (("cpu", True), ("tpu", False), ("cuda,cpu", False), (" cpu ", True)):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.cpu_only() is expected, platforms
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(host_memory, "_ACCELERATOR_MODULES", ("json",))  # an installed module as a stand-in plugin
  assert not host_memory.cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert not host_memory.keep_freed_memory()


def test_the_switch_turns_it_off(monkeypatch):
  monkeypatch.setattr(host_memory, "threads_running", lambda: 1)  # pytest's own threads aside
  monkeypatch.setenv(host_memory.SWITCH, "0")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not host_memory.keep_freed_memory()
  monkeypatch.setenv(host_memory.SWITCH, "1")
  assert host_memory.keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_it_is_kept_for_steps_whose_temporaries_glibc_would_map(monkeypatch):
  from ml_collections import ConfigDict

  from nin_jax.model import models

  imagenet = ConfigDict(dict(model="nin_imagenet", image_size=0, batch_size=32, dtype="bfloat16"))
  # By hand: 54*54*96*3 + 27*27*96 + 27*27*256*3 + 13*13*256 + 13*13*384*3 + 6*6*384 + 6*6*3,048
  # = 1,831,168 values per image, 2 bytes each.
  assert models.activation_bytes(models.get_spec("nin_imagenet"), 224, 32, "bfloat16") == 1_831_168 * 32 * 2
  default = ConfigDict(dict(model="nin_mnist", image_size=0, batch_size=32, dtype="bfloat16"))  # 14.6 MiB
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv(host_memory.SWITCH, raising=False)
  monkeypatch.setattr(host_memory, "threads_running", lambda: 1)  # pytest's own threads aside
  glibc = platform.libc_ver()[0] == "glibc"
  assert host_memory.keep_for(imagenet) is glibc
  assert not host_memory.keep_for(default)
  assert not host_memory.keep_for(
    ConfigDict(dict(model="no_such_model", image_size=0, batch_size=32, dtype="bfloat16"))
  )
  monkeypatch.setenv(host_memory.SWITCH, "1")
  assert host_memory.keep_for(default) is glibc
  monkeypatch.setenv(host_memory.SWITCH, "0")
  assert not host_memory.keep_for(imagenet)
