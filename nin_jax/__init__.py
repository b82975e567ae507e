"""nin_jax: Network in Network in JAX/Flax."""

import os

# TensorFlow (the ImageNet pipeline, TFDS) prints its C++ start-up lines ("This TensorFlow
# binary is optimized...", "oneDNN custom operations are on...") when it loads unless this is
# set first; the package is imported before any of its modules, so every entry point
# (nin_jax.main, nin_jax.data.imagenet_prepare, the notebooks) is covered. Only logging changes;
# a value the user set is kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# On a CPU with AVX512-BF16 or AMX (a Zen 4 EPYC, a Xeon) TensorFlow also turns on its own oneDNN
# ops and says so through absl before TF_CPP_MIN_LOG_LEVEL applies. Its ops only decode and
# resize images here (the model is JAX's), so they are left off, and with them the line.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
