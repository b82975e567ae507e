"""Where metrics go: `metrics.jsonl`, TensorBoard event files, and the console.

Only the first host writes; the others keep quiet so logs are not duplicated.
"""

from __future__ import annotations

import json
import math
import sys

from etils import epath

from nin_jax.run import workdir as workdir_lib

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"  # Lines of steps a resumed run trained again.


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLog:
  """`metrics.jsonl`: one JSON object per line and one line per step, appended to (a resume
  first moves the lines of steps it trains again to `metrics.superseded.jsonl`).

  Object stores cannot append (gcsfs's append mode silently overwrites), so on a URL
  the log reads the existing object once, at start, and rewrites the whole object at
  each write; an upload replaces the object atomically, so readers always see every
  earlier line, a resumed run's included. On a local disk lines are appended, so
  `tail -f` works.
  """

  def __init__(self, path: epath.Path):
    self.path, self._remote = path, workdir_lib.is_url(path)
    if self._remote:
      self._text = path.read_text() if path.exists() else ""
    else:
      self._drop_partial_last_line()
      self._file = path.open("a", encoding="utf-8")

  def _drop_partial_last_line(self) -> None:
    """A run killed mid-append can leave half a line; the next line must not extend it."""
    if not self.path.exists():
      return
    data = self.path.read_bytes()
    if data and not data.endswith(b"\n"):
      with open(self.path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)

  def supersede_after(self, step: int) -> int:
    """Moves the lines of steps after `step` (the checkpoint a run resumes from) to
    `metrics.superseded.jsonl` and returns how many: a run stopped between a log step and
    its next checkpoint had written them, and the resumed run trains and logs those steps
    again, so `metrics.jsonl` keeps one line per step and nothing is lost. The superseded
    lines are written first: a crash in between leaves them in both files, never in none."""
    text = self._text if self._remote else (self.path.read_text() if self.path.exists() else "")
    lines = text.splitlines(keepends=True)
    later = [line for line in lines if json.loads(line)["step"] > step]
    if not later:
      return 0
    superseded = self.path.parent / SUPERSEDED_FILE
    earlier = superseded.read_text() if superseded.exists() else ""
    workdir_lib.write_text(superseded, earlier + "".join(later))
    kept = "".join(line for line in lines if json.loads(line)["step"] <= step)
    if self._remote:
      self._text = kept
      self.path.write_text(kept)
    else:
      self._file.close()
      workdir_lib.write_text(self.path, kept)
      self._file = self.path.open("a", encoding="utf-8")
    return len(later)

  def append(self, record: dict) -> None:
    line = json.dumps(record) + "\n"
    if self._remote:
      self._text += line
      self.path.write_text(self._text)
    else:
      self._file.write(line)
      self._file.flush()

  def records(self) -> list[dict]:
    text = self._text if self._remote else self.path.read_text()
    return [json.loads(line) for line in text.splitlines()]

  def close(self) -> None:
    if not self._remote:
      self._file.close()


class Reporter:
  """Writes `metrics.jsonl` (resumed runs extend it), mirrors scalars to TensorBoard,
  and prints a progress line."""

  def __init__(
    self, workdir: epath.Path, *, total_steps: int, enabled: bool = True, tensorboard: bool = True, stream=None
  ):
    self.enabled, self.total_steps, self.stream = enabled, total_steps, stream
    self._tensorboard_dir = str(workdir / "tensorboard") if tensorboard else None
    self._tb, self._closed = None, False
    if enabled:
      self.log = MetricsLog(workdir / METRICS_FILE)

  def _scalars(self, step: int, metrics: dict) -> None:
    """TensorBoard events; the writer (and its file) appears with the first scalar."""
    if self._tb is None:
      from tensorboardX import SummaryWriter  # Event files without installing TensorBoard.

      self._tb = SummaryWriter(self._tensorboard_dir)  # gs:// via google-cloud-storage.
    for key, value in metrics.items():
      if isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, global_step=int(step))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}}
    self.log.append(record)
    if self._tensorboard_dir is not None:
      self._scalars(step, metrics)

  def resume_at(self, step: int) -> None:
    """Before a run (re)starts at `step`: earlier lines of later steps go to the superseded
    file (`MetricsLog.supersede_after`), saying so."""
    if self.enabled:
      moved = self.log.supersede_after(step)
      if moved:
        self.print(
          f"moved {moved} metric line(s) of steps after {step}, logged before the run stopped and "
          f"trained again now, to {SUPERSEDED_FILE}"
        )

  def print(self, message: str) -> None:
    if self.enabled:
      print(message, file=self.stream or sys.stdout, flush=True)

  def progress(self, step: int, metrics: dict[str, float], steps_per_second: float) -> None:
    """`step 200/1875 10.7% | loss 0.5123 | top-1 81.2% | lr 1.2e-03 | 302 img/s | ETA 8m12s`."""
    eta = (self.total_steps - step) / steps_per_second if steps_per_second > 0 else float("nan")
    parts = [
      f"step {step}/{self.total_steps} {100 * step / self.total_steps:5.1f}%",
      f"loss {metrics['train_loss']:.4f}",
      f"top-1 {100 * metrics['train_accuracy']:.1f}%",
    ]
    if "train_top5_accuracy" in metrics:
      parts.append(f"top-5 {100 * metrics['train_top5_accuracy']:.1f}%")
    if metrics.get("skipped_images"):
      parts.append(f"{metrics['skipped_images']} undecodable image(s) skipped")
    parts += [
      f"lr {metrics['learning_rate']:.2e}",
      f"{metrics['images_per_sec']:.0f} img/s",
      f"ETA {format_duration(eta) if math.isfinite(eta) else '?'}",
    ]
    self.print(" | ".join(parts))

  def close(self) -> None:
    if self.enabled and not self._closed:
      self._closed = True
      self.log.close()
      if self._tb is not None:
        self._tb.flush()
        self._tb.close()
