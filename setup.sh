#!/usr/bin/env bash
# One-command set-up: the pinned Python packages, the offline Fashion-MNIST data (Debian's
# dataset-fashion-mnist) that the quick start, the tests and CI train on, and the oneDNN CPU
# layers (nin_jax/model/onednn.py), built here so that a broken toolchain fails the set-up with the
# compiler's first error line instead of leaving training on XLA's slower kernels; then which
# dtype is faster on this CPU (nin_jax/model/dtype_probe.py), timed once here, where nothing else
# runs, rather than at the first training run.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist
  else
    echo "note: could not install Debian's dataset-fashion-mnist; Fashion-MNIST will come from TFDS instead." >&2
  fi
fi

python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
python -m nin_jax.model.onednn_build
python -m nin_jax.model.dtype_probe
