"""One writer per workdir: a lock file that works on local disks and on object stores.

Two runs in one workdir would interleave `metrics.jsonl`, and Orbax in one deletes the
other's temporary checkpoint directories. The run (its first host; the others belong
to it) holds `<workdir>/lock.json`: who (host, pid), since when, and a heartbeat that a
daemon thread refreshes every `HEARTBEAT_SECONDS`.

A lock is stale, and a new run takes it over, when its holder ran on this host and
that process no longer exists, or when its heartbeat is older than `STALE_SECONDS` (a
crashed or preempted host elsewhere; a live holder refreshes it 4 times in that time).
On a local disk the lock file is created exclusively (O_EXCL). Object stores have no
exclusive create, so there taking the lock writes a random token and reads it back
after a pause: of two runs starting at once, the one whose token is not there gives up.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from etils import epath

from nin_jax import workdir as workdir_lib
from nin_jax.errors import UserError

LOCK_FILE = "lock.json"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 120.0
_SETTLE_SECONDS = 0.5  # Between writing the token and reading it back.


class WorkdirInUse(UserError):
  """Another live run holds the workdir."""


def _alive_here(holder: dict) -> bool:
  if holder.get("host") != socket.gethostname():
    return True  # Unknown from here: the heartbeat decides.
  try:
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


def _read(path: epath.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):  # Gone, or caught mid-write: no valid holder.
    return None


class WorkdirLock:
  """Context manager holding `<workdir>/lock.json` for one run."""

  def __init__(self, workdir: epath.Path, say=print):
    self.path, self._say = workdir / LOCK_FILE, say
    self._record = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                    "since": time.time()}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _write(self) -> None:
    workdir_lib.write_text(self.path, json.dumps({**self._record, "heartbeat": time.time()}))

  def __enter__(self) -> WorkdirLock:
    holder = _read(self.path)
    if holder is None and not workdir_lib.is_url(self.path) and self.path.exists():
      if time.time() - os.path.getmtime(self.path) > 10 * _SETTLE_SECONDS:  # Its writer died mid-write.
        self.path.unlink(missing_ok=True)
    if holder is not None:
      age = time.time() - float(holder.get("heartbeat", 0))
      if _alive_here(holder) and age < STALE_SECONDS:
        raise WorkdirInUse(
            f"{self.path.parent} is in use by process {holder.get('pid')} on {holder.get('host')} (since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))}, alive "
            f"{age:.0f} s ago); wait for it to finish or stop it, or use another --workdir.")
      self._say(f"warning: taking over the stale lock of process {holder.get('pid')} on "
                f"{holder.get('host')} (last alive {age:.0f} s ago).")
      self.path.unlink(missing_ok=True)
    if not self._take():
      raise WorkdirInUse(f"{self.path.parent} was taken by another run that started at the same time; "
                         "use another --workdir.")
    self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
    self._thread.start()
    return self

  def _take(self) -> bool:
    if workdir_lib.is_url(self.path):
      self._write()
      time.sleep(_SETTLE_SECONDS)
      return (_read(self.path) or {}).get("token") == self._record["token"]
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      return False
    os.close(fd)
    self._write()
    return True

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        self._write()
      except OSError as e:  # A failing store fails the run's own writes too; they say more.
        self._say(f"warning: could not refresh {self.path} ({e}).")

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if (_read(self.path) or {}).get("token") == self._record["token"]:
      self.path.unlink()
