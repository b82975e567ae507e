"""Test set-up: 8 virtual CPU devices, so sharding is tested on any machine.

XLA reads the flag once, when JAX first initialises its backend, so it must be set
before any test imports JAX.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
