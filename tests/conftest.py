"""Test set-up: 8 virtual CPU devices, so sharding is tested on any machine.

XLA reads the flag once, when JAX first initialises its backend, so it must be set
before any test imports JAX.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Most tests compile a model to run it a few steps: XLA's optimisation passes cost more
# than they save there (measured: 188 -> 114 s on 7 training tests). Every comparison runs
# both of its sides under it (subprocesses inherit it), oneDNN's layers are unaffected, and
# the fused-kernel test still sees XLA's fusions (its gradients differ from the plain path).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


import pytest  # noqa: E402  (after the XLA flag, like everything that may import JAX)


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
  """(config, workdir, final metrics) of one uninterrupted local run of `helpers.resume_config()`,
  which the resume tests (local disk and gs://) must reproduce exactly. Trained once per session."""
  from nin_jax import train
  from tests import helpers

  config = helpers.resume_config()
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return config, workdir, train.train_and_evaluate(config, str(workdir))
