"""An independent PyTorch NIN with Caffe semantics, and its train-step timer (benchmark only).

  python -m benchmarks.torch_nin --model nin_cifar10 --batch_size 128

Built from the same architecture facts as `nin_jax.model.models` (the `ModelSpec` of a variant:
kernels, widths, strides, padding, pools, dropout), implemented with PyTorch's own layers:
1x1 layers as 1x1 convolutions, 3x3/2 pools with Caffe's ceil-mode output size (an average
window divides by its in-image count), ReLU after every layer, GAP head. Timed with the
protocol of `python -m nin_jax.benchmark`: channels_last, float32, SGD with momentum,
synthetic data, 2 threads by default, warm-up, then the median of repeats. PyTorch is a
benchmark-only dependency:  pip install torch==2.13.0+cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

from nin_jax.model import models


def build(name: str, head: str = "gap") -> nn.Module:
  """The variant `name` as a torch module taking NCHW (channels_last memory) images."""
  spec = models.get_spec(name)
  layers, channels = [], spec.in_channels
  for block in spec.blocks:
    for i, width in enumerate(block.features):
      kernel = block.kernel_size if i == 0 else 1
      layers += [
        nn.Conv2d(
          channels, width, kernel, stride=block.stride if i == 0 else 1, padding=block.padding if i == 0 else 0
        ),
        nn.ReLU(),
      ]
      channels = width
    if block.pool == "max":
      layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
    elif block.pool == "avg":
      layers.append(nn.AvgPool2d(3, 2, ceil_mode=True, count_include_pad=False))
    if block.dropout:
      layers.append(nn.Dropout(block.dropout))
  if head != "gap":
    raise ValueError("the PyTorch reference has the GAP head only")
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
  return nn.Sequential(*layers)


def time_train_step(
  name: str,
  batch_size: int,
  *,
  steps: int = 10,
  repeats: int = 5,
  warmup: int = 3,
  threads: int = 2,
  dtype: str = "float32",
) -> dict:
  """Images/s of SGD train steps on synthetic data, with the JAX benchmark's protocol.

  `dtype="bfloat16"` is PyTorch's mixed precision, as the project's: float32 parameters,
  the forward pass under `torch.autocast` to bfloat16 (oneDNN's AMX kernels where the CPU
  has them), gradients flowing back in the dtypes autocast chose.
  """
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  spec = models.get_spec(name)
  model = build(name).to(memory_format=torch.channels_last).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
  images = torch.randn(batch_size, spec.in_channels, spec.image_size, spec.image_size).to(
    memory_format=torch.channels_last
  )
  labels = torch.randint(0, spec.num_classes, (batch_size,))

  def run(count):
    for _ in range(count):
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        loss = nn.functional.cross_entropy(model(images), labels)
      loss.backward()
      optimizer.step()

  run(warmup)
  step_times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run(steps)
    step_times.append((time.perf_counter() - start) / steps)
  median = statistics.median(step_times)
  return {
    "framework": f"torch {torch.__version__}",
    "model": name,
    "batch_size": batch_size,
    "dtype": dtype,
    "threads": threads,
    "step_seconds_median": median,
    "images_per_sec": batch_size / median,
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_nin", description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="nin_cifar10", choices=sorted(models.VARIANTS))
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--dtype", default="float32", choices=sorted(models.DTYPES))
  args = parser.parse_args(argv)
  print(
    json.dumps(
      time_train_step(
        args.model,
        args.batch_size,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        dtype=args.dtype,
      ),
      sort_keys=True,
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
