"""nin_jax: Network in Network in JAX/Flax."""

import os

# TensorFlow (the ImageNet pipeline, TFDS) prints its C++ start-up lines ("This TensorFlow
# binary is optimized...", "oneDNN custom operations are on...") when it loads unless this is
# set first; the package is imported before any of its modules, so every entry point
# (nin_jax.main, nin_jax.data.imagenet_prepare, the notebooks) is covered. Only logging changes;
# a value the user set is kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
