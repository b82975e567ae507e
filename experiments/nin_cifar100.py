"""NIN on CIFAR-100: the CIFAR-10 recipe with a 100-way last layer, no augmentation.

Command:  python -m nin_jax.main --config experiments/nin_cifar100.py --workdir /tmp/nin_c100
Hardware: one GPU or TPU host.
Expected: paper 35.68% test error without augmentation (paper's number, not measured here).
"""

from experiments import nin_cifar10


def get_config():
  c = nin_cifar10.get_config("noaug")
  c.dataset = "cifar100"
  c.model = "nin_cifar100"
  return c
