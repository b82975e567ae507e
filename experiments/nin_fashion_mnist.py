"""NIN (the paper's MNIST model) on Fashion-MNIST: the embedded default, runs offline.

Command:  python -m nin_jax.main --config experiments/nin_fashion_mnist.py --workdir /tmp/nin_fmnist
Hardware: 2 CPU cores (XLA:CPU), no accelerator.
Data:     Debian's dataset-fashion-mnist (60,000 train / 10,000 test images), else TFDS.
Expected: MEASURED_PLACEHOLDER
"""

from nin_jax.configs import default_config


def get_config():
  c = default_config()
  c.dataset = "fashion_mnist"
  c.model = "nin_mnist"
  c.preprocess = "standardize"
  c.augment = "none"
  c.batch_size = 128
  c.num_epochs = 4.0
  c.optimizer = "adamw"
  c.learning_rate = 2e-3
  c.weight_decay = 5e-4
  c.bias_lr_mult = 1.0
  c.schedule = "cosine"
  c.warmup_epochs = 200 / 468
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  return c
