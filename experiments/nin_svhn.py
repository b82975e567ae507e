"""NIN on SVHN (the paper's SVHN model) with local contrast normalisation; no flips: digits.

Command:  python -m nin_jax.main --config experiments/nin_svhn.py --workdir /tmp/nin_svhn
Hardware: one GPU or TPU host; data through TFDS `svhn_cropped` (train split, 73,257 images;
          the paper also used the `extra` split).
Expected: paper 2.35% test error (paper's number, not measured here).
"""

from nin_jax.configs import default_config


def get_config():
  c = default_config()
  c.dataset = "svhn"
  c.model = "nin_svhn"
  c.preprocess = "lcn"
  c.augment = "none"  # Horizontal flips would turn digits into other shapes.
  c.batch_size = 128
  c.num_epochs = 40.0
  c.optimizer = "sgd"
  c.learning_rate = 0.05
  c.weight_decay = 1e-4
  c.schedule = "step"
  c.decay_epochs = (20.0, 30.0)
  c.warmup_epochs = 1.0
  c.checkpoint_every_steps = 2000
  return c
