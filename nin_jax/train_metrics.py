"""Train metrics between log steps: on the device until a log or checkpoint step needs them.

Fetching them every step would make the host wait for the device before it can feed
the next batch; fetching them at log and checkpoint steps costs one transfer per
window and still sees every step's loss, so a NaN is caught before it is saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax

from nin_jax.errors import TrainingDiverged


class TrainMetrics:
  """Train metrics of the current log window: device arrays until a log or checkpoint
  step fetches them. The host-side sums go into checkpoints, so a resumed run logs
  exactly what an uninterrupted one logs. Fetching also checks every step's loss: a
  NaN stops the run before it can be saved, and a loss stuck at ln(classes) warns."""

  def __init__(
    self,
    saved: dict,
    *,
    num_classes: int,
    stuck_loss_steps: int,
    say: Callable,
    diverged: Callable[[str], TrainingDiverged],
  ):
    self._diverged = diverged  # what happened -> the error that says what to do
    self.sums = dict(saved.get("window", {"loss": 0.0, "correct": 0.0, "correct_top5": 0.0, "steps": 0}))
    self.stuck_steps = int(saved.get("stuck_steps", 0))
    self.pending: list[dict[str, jax.Array]] = []
    self._num_classes, self._stuck_loss_steps, self._say = num_classes, stuck_loss_steps, say

  def fetch(self, step: int) -> None:
    """Adds the pending steps (the last of which is `step`) to the host sums."""
    fetched, self.pending = jax.device_get(self.pending), []
    chance = math.log(self._num_classes)
    for offset, metrics in enumerate(fetched, start=step - len(fetched) + 1):
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise self._diverged(f"The loss became {loss} at step {offset}")
      for key, value in (
        ("loss", loss),
        ("correct", metrics["correct"]),
        ("correct_top5", metrics.get("correct_top5", 0.0)),
        ("steps", 1),
      ):
        self.sums[key] += float(value)
      self.stuck_steps = self.stuck_steps + 1 if abs(loss - chance) < 0.01 else 0
      if self.stuck_steps == self._stuck_loss_steps:
        self._say(
          f"warning: the loss has stayed at ln({self._num_classes})={chance:.4f} for "
          f"{self.stuck_steps} steps: the last ReLU has likely died, so every logit is 0 "
          "(NIN's known failure). Use --config.init=he, a lower learning rate or warm-up, "
          "or another seed."
        )

  def summary(self, batch_size: int, top5: bool) -> dict[str, float]:
    """The window's means, and a new window."""
    n = self.sums["steps"] * batch_size
    out = {"train_loss": self.sums["loss"] / self.sums["steps"], "train_accuracy": self.sums["correct"] / n}
    if top5:
      out["train_top5_accuracy"] = self.sums["correct_top5"] / n
    self.sums = {k: 0.0 if k != "steps" else 0 for k in self.sums}
    return out

  def host_state(self) -> dict:
    return {"window": dict(self.sums), "stuck_steps": self.stuck_steps}
