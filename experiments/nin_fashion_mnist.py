"""NIN (the paper's MNIST model) on Fashion-MNIST: the embedded default, runs offline.

Command:  python -m nin_jax.main --config experiments/nin_fashion_mnist.py --workdir /tmp/nin_fmnist
Hardware: 2 CPU cores (XLA:CPU), no accelerator.
Data:     Debian's dataset-fashion-mnist (60,000 train / 10,000 test images), else TFDS.
Expected: 92.25% top-1 on all 10,000 test images (seed 0), measured on this 2-core machine in
          1,073 s wall clock (17.9 min) including start-up, compilation and an evaluation per
          epoch; ~305 images/s in training. The issue's bar, 93.0% in 20 minutes, is not met:
          at this speed 20 minutes hold ~5.5 epochs, and the model still underfits at the end
          (train top-1 93.8%).

The recipe is tuned for a short CPU budget rather than copied from the paper: no
dropout (it slows the first epochs, and 5 epochs barely overfit), label smoothing
0.1, horizontal flips, AdamW with a short warm-up and a cosine decay, and batch 64
(as many images per second as batch 128 here, twice the updates).
"""

from nin_jax.configs import default_config


def get_config():
  c = default_config()
  c.dataset = "fashion_mnist"
  c.model = "nin_mnist"
  c.dropout = 0.0
  c.preprocess = "standardize"
  c.augment = "flip"
  c.batch_size = 64
  c.num_epochs = 5.0
  c.optimizer = "adamw"
  c.learning_rate = 2e-3
  c.weight_decay = 5e-4
  c.bias_lr_mult = 1.0
  c.schedule = "cosine"
  c.warmup_epochs = 0.25
  c.label_smoothing = 0.1
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  return c
