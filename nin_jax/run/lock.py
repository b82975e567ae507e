"""One writer per workdir: a lock file that works on local disks and on object stores.

Two runs in one workdir would interleave `metrics.jsonl`, and Orbax in one deletes the
other's temporary checkpoint directories. The run (its first host; the others belong
to it) holds `<workdir>/lock.json`: who (host, pid), since when, and a heartbeat that a
daemon thread refreshes every `HEARTBEAT_SECONDS`.

A lock is stale, and a new run takes it over, when its holder ran on this host and
that process no longer exists, or when its heartbeat is older than `STALE_SECONDS` (a
crashed or preempted host elsewhere; a live holder refreshes it 4 times in that time).
On a local disk the lock file is created exclusively (O_EXCL). On Cloud Storage every
change is conditional on the object's generation, the store's own compare-and-swap (as
TensorStore writes Orbax's manifests): the lock is created only if no object exists
(`ifGenerationMatch=0`), and refreshed, released or taken over from a stale holder only
if it is still the generation last seen, so of two runs starting at once exactly one
holds it, however slow either's uploads are.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from etils import epath

from nin_jax.errors import UserError
from nin_jax.run import workdir as workdir_lib

LOCK_FILE = "lock.json"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 120.0
_SETTLE_SECONDS = 0.5  # A local lock file younger than 10x this may still be being written.


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


class _GcsObject:
  """The lock object on Cloud Storage, every write conditional on its generation."""

  def __init__(self, url: str):
    from google.cloud import storage  # pylint: disable=g-import-not-at-top  # Only for gs:// workdirs.

    bucket, _, name = url[len("gs://") :].partition("/")
    self._blob = storage.Client().bucket(bucket).blob(name)
    self.generation: int | None = None

  def read(self) -> tuple[dict | None, int | None]:
    """(holder, generation), or (None, None) when there is no lock."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    while True:  # Until a generation is read whole; each retry means another run just wrote it.
      try:
        self._blob.reload()
        text = self._blob.download_as_text(if_generation_match=self._blob.generation)
      except exceptions.NotFound:
        return None, None
      except exceptions.PreconditionFailed:  # Rewritten between the two requests: read it again.
        continue
      try:
        return json.loads(text), self._blob.generation
      except json.JSONDecodeError:  # Uploads are atomic, so this is not a write in progress: damaged.
        return {}, self._blob.generation

  def write(self, text: str, if_generation_match: int) -> bool:
    """Writes `text` if the object is at that generation (0: absent); False if it is not."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    try:
      self._blob.upload_from_string(text, content_type="application/json", if_generation_match=if_generation_match)
    except exceptions.PreconditionFailed:
      return False
    self.generation = self._blob.generation
    return True

  def delete(self, if_generation_match: int) -> bool:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    try:
      self._blob.delete(if_generation_match=if_generation_match)
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      return False
    return True


class WorkdirLock:
  """Context manager holding `<workdir>/lock.json` for one run. `lost` becomes true when
  another run took the lock over behind this one's back (a heartbeat that stopped for more
  than STALE_SECONDS): the trainer then stops without saving."""

  def __init__(self, workdir: epath.Path, say=print):
    self.path, self._say = workdir / LOCK_FILE, say
    self._record = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "since": time.time()}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    if workdir_lib.is_url(self.path) and not str(self.path).startswith("gs://"):
      raise UserError(
        f"{workdir} is a URL other than gs://, where this lock cannot be made exact; use a gs:// or a local --workdir."
      )
    self._object = _GcsObject(str(self.path)) if workdir_lib.is_url(self.path) else None
    self.lost = False

  def _text(self) -> str:
    return json.dumps({**self._record, "heartbeat": time.time()})

  def __enter__(self) -> WorkdirLock:
    if self._object is not None:
      holder, generation = self._object.read()
    else:
      holder, generation = _read(self.path), None
      if holder is None and self.path.exists() and time.time() - os.path.getmtime(self.path) > 10 * _SETTLE_SECONDS:
        self.path.unlink(missing_ok=True)  # Its writer died mid-write.
    if holder is not None:
      age = time.time() - float(holder.get("heartbeat", 0))
      if _alive_here(holder) and age < STALE_SECONDS:
        raise WorkdirInUse(
          f"{self.path.parent} is in use by process {holder.get('pid')} on {holder.get('host')} (since "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))}, alive "
          f"{age:.0f} s ago); wait for it to finish or stop it, or use another --workdir."
        )
      self._say(
        f"warning: taking over the stale lock of process {holder['pid']} on {holder.get('host')} (last "
        f"alive {age:.0f} s ago)."
        if "pid" in holder
        else f"warning: replacing the unreadable {self.path}."
      )
      if self._object is not None:
        self._object.delete(if_generation_match=generation)  # Only the stale lock, never a newer one.
      else:
        self.path.unlink(missing_ok=True)
    if not self._take():
      raise WorkdirInUse(
        f"{self.path.parent} was taken by another run that started at the same time; use another --workdir."
      )
    self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
    self._thread.start()
    return self

  def _take(self) -> bool:
    if self._object is not None:
      return self._object.write(self._text(), if_generation_match=0)  # Created only if absent.
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      return False
    os.close(fd)
    workdir_lib.write_text(self.path, self._text())
    return True

  def _refresh(self) -> bool:
    """Writes a new heartbeat; False when the lock is no longer this run's."""
    if self._object is not None:
      return self._object.write(self._text(), if_generation_match=self._object.generation)
    if (_read(self.path) or {}).get("token") != self._record["token"]:
      return False
    workdir_lib.write_text(self.path, self._text())
    return True

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        if not self._refresh():
          self.lost = True
          self._say(
            f"error: another run took over {self.path.parent} (this run's heartbeat stopped for more "
            f"than {STALE_SECONDS:.0f} s); this run stops and saves nothing more."
          )
          return
      except Exception as e:  # pylint: disable=broad-except  # A failing store fails the run's own writes too.
        self._say(f"warning: could not refresh {self.path} ({e}).")

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self.lost:
      return
    if self._object is not None:
      self._object.delete(if_generation_match=self._object.generation)
    elif (_read(self.path) or {}).get("token") == self._record["token"]:
      self.path.unlink()
