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
import resource
from nin_jax import host_memory
host_memory.keep_freed_memory()  # before JAX starts, as the entry points do
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


def _faults(keep: str) -> int:
  env = {**os.environ, host_memory.SWITCH: keep, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a plain run has
  out = subprocess.run(
    [sys.executable, "-c", _FAULTS_OF_FIVE_STEPS], env=env, capture_output=True, text=True, check=True
  )
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator and Linux's page faults")
@pytest.mark.skipif(
  "[always]" in (Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text() if sys.platform == "linux" else ""),
  reason="transparent huge pages for every mapping: 512 times fewer faults either way",
)
def test_a_steps_temporary_is_reused_instead_of_faulted_in_again():
  pages_per_step = _MIB * 2**20 // os.sysconf("SC_PAGE_SIZE")
  without = _faults("0")
  kept = _faults("1")
  # Measured on the Zen 4: 81,926 faults without (every page of every step) and 0 with the setting.
  assert without >= 4 * pages_per_step, without
  assert kept <= pages_per_step // 10, kept


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
