"""What the training tests share: a tiny real-data config, metrics, parameters, the CLI."""

import contextlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from nin_jax import analysis, configs
from nin_jax.data import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fmnist = pytest.mark.skipif(
  not os.path.isdir(datasets.DEBIAN_FASHION_MNIST),
  reason="needs Debian's dataset-fashion-mnist (bash setup.sh installs it)",
)


def small_config(**overrides):
  c = configs.default_config()
  c.update(
    dict(
      dataset="fashion_mnist",
      model="nin_mnist",
      train_examples=512,
      eval_examples=300,
      batch_size=32,
      eval_batch_size=64,
      num_train_steps=8,
      optimizer="adamw",
      learning_rate=2e-3,
      schedule="cosine",
      warmup_epochs=0.0,
      log_every_steps=2,
      checkpoint_every_steps=4,
      eval_every_steps=100,
      seed=0,
    )
  )
  c.update(overrides)
  return c


@contextlib.contextmanager
def cpu_transfer_guard():
  """Makes XLA:CPU honour `jax.transfer_guard_device_to_host` as GPUs and TPUs do.

  A CPU array already lives in host memory, so JAX never checks the guard when one is
  read (measured: float(), np.asarray, .item() and jax.device_get all pass under
  "disallow_explicit"). float/int/bool, .tolist() and jax.device_get read through
  `ArrayImpl._value`; inside this context that property raises wherever the current
  guard level disallows transfers. np.asarray and .item() of a CPU array take NumPy's
  zero-copy buffer protocol instead, which Python cannot intercept; on GPU and TPU,
  where that protocol does not exist, JAX's own guard catches them.
  """
  from jax._src import array
  from jax._src import config as jax_config

  original = array.ArrayImpl._value

  def guarded(self):
    level = jax_config.transfer_guard_device_to_host.value
    if level in ("disallow", "disallow_explicit"):
      raise RuntimeError(f"device-to-host transfer of a {self.shape} array under transfer guard {level!r}")
    return original.fget(self)

  array.ArrayImpl._value = property(guarded)
  try:
    yield
  finally:
    array.ArrayImpl._value = original


def resume_config():
  """16 steps that log every 2, save every 4 (keeping 2) and evaluate at 8 and 16: the run the
  resume tests stop with SIGTERM and resume. SGD (the paper's optimizer), whose update is
  linear in the gradient, so that 8 devices on 2 hosts match 8 on one to ~1e-6; Adam divides
  by sqrt(v), which turns summation-order noise in near-zero gradients into ~3e-5 steps."""
  return small_config(
    num_train_steps=16,
    checkpoint_every_steps=4,
    keep_checkpoints=2,
    eval_every_steps=8,
    optimizer="sgd",
    learning_rate=0.02,
  )


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def without_timing(records):
  return [{k: v for k, v in r.items() if k != "images_per_sec"} for r in records]


def flat_params(workdir, config):
  model, _ = analysis.load_model(str(workdir), config)
  params = nnx.state(model, nnx.Param)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


def predict(model, images) -> np.ndarray:
  """Logits of a batch in one jitted call (an eager NNX call compiles every op on its own)."""
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, images))


def main_command(*args) -> list[str]:
  """`python -m nin_jax.main ARGS` as the in-process tests train (without main's CPU fusions)."""
  return [sys.executable, "-m", "nin_jax.main", "--nofast_cpu_fusions", *args]


def run_main(args, cwd=ROOT, **kwargs):
  """`python -m nin_jax.main` as a subprocess, stdout and stderr piped as text."""
  return subprocess.Popen(
    main_command(*args),
    cwd=cwd,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **kwargs,
  )


def one_device_env(**extra) -> dict[str, str]:
  """This process's environment without conftest's 8 virtual devices (a CPU user's one device,
  where the oneDNN layers run), plus `extra`, for a subprocess."""
  return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **extra}


def run_main_until(args, line_start: str, **kwargs):
  """`run_main(args)` sent SIGTERM once it prints a line starting with `line_start` (training has
  visibly started); returns its exit code, the rest of its stdout, and its stderr."""
  import signal  # pylint: disable=g-import-not-at-top

  proc = run_main(args, **kwargs)
  for line in proc.stdout:
    if line.startswith(line_start):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def write_config_file(directory, config) -> str:
  """The exact config as a config file, so a subprocess trains what the test trains."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "config.py")
  with open(path, "w") as f:
    f.write(f"import ml_collections\n\n\ndef get_config():\n  return ml_collections.ConfigDict({config.to_dict()!r})\n")
  return path


def can_unshare_network() -> bool:
  """Whether this machine lets a test run a command in a network namespace of its own
  (`unshare -n`: root), where nothing it does leaves the machine."""
  import shutil  # pylint: disable=g-import-not-at-top

  return (
    shutil.which("unshare") is not None
    and subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode == 0
  )
