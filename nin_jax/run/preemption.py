"""Stopping cleanly on SIGTERM (a preemption notice) or Ctrl-C: finish the step, save, exit.

One process: Python handlers for SIGTERM and SIGINT set a flag that the loop reads
after each step.

Several processes (`jax.distributed`): every host must save at the same step, and a
collective every step to agree on it would make each host wait for the device.
JAX's preemption sync service agrees without one: its C++ handler catches SIGTERM on
any host, the hosts settle on a step in the background, and
`reached_preemption_sync_point(step)` turns True on every host at that step. A
Python SIGTERM handler would replace the C++ one (measured: the hosts then never
agree), so with several processes only SIGINT gets a Python handler, which forwards
SIGTERM to its own process.
"""

from __future__ import annotations

import os
import signal

import jax
from jax.experimental import multihost_utils


class StopRequest:
  """Context manager: `requested(step)` is True, on every host at the same step, once a
  stop signal has arrived anywhere."""

  def __init__(self, say=print):
    self.signum: int | None = None
    self._say, self._previous = say, {}
    self._multihost = jax.process_count() > 1

  def __enter__(self) -> StopRequest:
    signals = (signal.SIGINT,) if self._multihost else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. a notebook worker): no handler.
        pass
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C stops at once.
    self.signum = signum
    self._say(f"received {signal.Signals(signum).name}: finishing this step and saving a checkpoint")
    if self._multihost:
      os.kill(os.getpid(), signal.SIGTERM)  # Into JAX's preemption sync, which tells every host.

  def requested(self, step: int) -> bool:
    if self._multihost:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signum is not None

  @property
  def signal(self) -> signal.Signals:
    """The signal that stopped this host (SIGTERM when it came through another host)."""
    return signal.Signals(self.signum or signal.SIGTERM)
