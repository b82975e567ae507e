"""Where metrics go: `metrics.jsonl`, TensorBoard event files, and the console.

Only the first host writes; the others keep quiet so logs are not duplicated.
"""

from __future__ import annotations

import json
import math
import os
import sys


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Reporter:
  """Appends one JSON object per line (never truncates, so resumed runs extend the
  log), mirrors scalars to TensorBoard, and prints a progress line."""

  def __init__(self, workdir: str, *, total_steps: int, enabled: bool = True,
               tensorboard: bool = True, stream=None):
    self.enabled, self.total_steps, self.stream = enabled, total_steps, stream
    self._tb = None
    if not enabled:
      return
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # Event files without installing TensorBoard.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, global_step=int(step))

  def print(self, message: str) -> None:
    if self.enabled:
      print(message, file=self.stream or sys.stdout, flush=True)

  def progress(self, step: int, metrics: dict[str, float], steps_per_second: float) -> None:
    """`step 200/1875 10.7% | loss 0.5123 | top-1 81.2% | lr 1.2e-03 | 302 img/s | ETA 8m12s`."""
    eta = (self.total_steps - step) / steps_per_second if steps_per_second > 0 else float("nan")
    parts = [f"step {step}/{self.total_steps} {100 * step / self.total_steps:5.1f}%",
             f"loss {metrics['train_loss']:.4f}", f"top-1 {100 * metrics['train_accuracy']:.1f}%"]
    if "train_top5_accuracy" in metrics:
      parts.append(f"top-5 {100 * metrics['train_top5_accuracy']:.1f}%")
    parts += [f"lr {metrics['learning_rate']:.2e}", f"{metrics['images_per_sec']:.0f} img/s",
              f"ETA {format_duration(eta) if math.isfinite(eta) else '?'}"]
    self.print(" | ".join(parts))

  def close(self) -> None:
    if self.enabled and not self._jsonl.closed:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.flush()
        self._tb.close()

