"""Durations (training, warm-up, decay) given in epochs or in steps, converted to steps.

One helper for every place that needs a length (the trainer, the schedules), in a module
of its own so that neither the configs nor the optimiser has to import the other.
"""

from __future__ import annotations

import math

import ml_collections

# (steps key, epochs key) of each duration; `steps` converts any of them.
DURATIONS = {
  "train": ("num_train_steps", "num_epochs"),
  "warmup": ("warmup_steps", "warmup_epochs"),
  "decay": ("decay_steps", "decay_epochs"),
}


def steps(config: ml_collections.ConfigDict, duration: str, steps_per_epoch: int):
  """A duration of `DURATIONS` in steps: its steps key when set (a number >= 0, > 0 for
  training, or a non-empty tuple), else its epochs key times `steps_per_epoch`, rounded."""
  steps_key, epochs_key = DURATIONS[duration]
  given, epochs = config[steps_key], config[epochs_key]
  if isinstance(given, (tuple, list)):
    return tuple(int(s) for s in given) if given else tuple(int(round(e * steps_per_epoch)) for e in epochs)
  if given > 0 or (given == 0 and duration != "train"):
    return int(given)
  if duration == "train":
    return max(int(math.ceil(epochs * steps_per_epoch)), 1)
  return int(round(epochs * steps_per_epoch))
