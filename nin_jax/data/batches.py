"""What every input pipeline gives the trainer: one host's share of each batch, and the data set.

Its own module so that the pipelines (`input_pipeline` for the in-memory sets, `imagenet`
for tf.data) share these types without importing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class Batch:
  """One host's share of a global batch. `mask` is 0 for eval padding; `skipped` counts the
  undecodable training images this host's stream has dropped so far (ImageNet)."""

  images: np.ndarray
  labels: np.ndarray
  mask: np.ndarray
  skipped: int = 0


@dataclasses.dataclass
class Data:
  """What the trainer needs: train batches from any step on, and a re-iterable eval split."""

  train_batches: Callable[[int], Iterator[Batch]]  # start step -> batches
  eval_batches: Callable[[], Iterator[Batch]]
  num_train_examples: int
  num_eval_examples: int
  notes: tuple[str, ...] = ()  # Lines the trainer prints before it starts (e.g. images left out).


def host_slice(global_batch: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that this host provides."""
  local = global_batch // process_count
  return slice(process_index * local, (process_index + 1) * local)
