"""NIN on MNIST, the paper's 3-block MNIST model (5x5 96-64-48, 128-96-48, 128-96-10).

Command:  python -m nin_jax.main --config experiments/nin_mnist.py --workdir /tmp/nin_mnist
Hardware: any; data through TFDS `mnist` (downloaded once by TFDS).
Expected: the paper reports 0.47% test error without augmentation (paper's number,
          not measured here: this machine cannot download MNIST).
"""

from nin_jax.configs import default_config


def get_config():
  c = default_config()
  c.dataset = "mnist"
  c.model = "nin_mnist"
  c.preprocess = "standardize"
  c.augment = "none"  # The paper's MNIST result uses no augmentation.
  c.batch_size = 128
  c.num_epochs = 30.0
  c.optimizer = "sgd"
  c.learning_rate = 0.05
  c.weight_decay = 1e-4
  c.schedule = "cosine"
  c.warmup_epochs = 1.0
  return c
