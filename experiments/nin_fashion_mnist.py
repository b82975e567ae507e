"""NIN (the paper's MNIST model) on Fashion-MNIST: the embedded default, runs offline.

Command:  python -m nin_jax.main --config experiments/nin_fashion_mnist.py --workdir /tmp/nin_fmnist
Hardware: 2 CPU cores (XLA:CPU), no accelerator.
Data:     Debian's dataset-fashion-mnist (60,000 train / 10,000 test images), else TFDS.
Expected: 92.95% top-1 on all 10,000 test images (seed 0), measured on a 2-core machine in
          1,026 s wall clock (17.1 min, start-up and compilation included) with nothing else
          running; train top-1 95.6% at the end. The issue-10 target of 93.5% in 20 minutes is
          not reached: at 7.5 epochs every variant tried ends between 91.9% and 92.95%
          (weight decay 0.05: 92.92%; crop+flip with weight decay 0.05: 92.38%; body dropout
          0.25: 92.95%; dropout 0.5: 91.93%; all seed 0).

The recipe is tuned for a short CPU budget rather than copied from the paper: no
dropout (at 7.5 epochs 0.25 ties and 0.5 loses 1.0 point), label smoothing
0.1, horizontal flips, AdamW with a short warm-up and a cosine decay, and batch 64
(as many images per second as batch 128 here, twice the updates). Evaluation runs
only at the end to leave the time to training; `--config.eval_every_steps=0` evaluates
once per epoch (~10 s each).
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
  c.num_epochs = 7.5
  c.optimizer = "adamw"
  c.learning_rate = 3e-3
  c.weight_decay = 5e-4
  c.bias_lr_mult = 1.0
  c.schedule = "cosine"
  c.warmup_epochs = 0.25
  c.label_smoothing = 0.1
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.eval_every_steps = -1  # Only at the end.
  return c
