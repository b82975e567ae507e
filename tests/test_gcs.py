"""A `gs://` workdir end to end, against a real GCS emulator on 127.0.0.1 (not a mock).

The trainer runs as a subprocess, because the GCS clients read their endpoints from
the environment once per process. It does not set EPATH_USE_TF: the trainer's own
default (gcsfs) is the path production takes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from tests.helpers import ROOT, needs_fmnist, read_metrics, run_main, without_timing, write_config_file

BUCKET = "nin-test"

pytestmark = pytest.mark.slow  # A GCS emulator process and trainer subprocesses.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def gcs():
  """A GCS emulator process (`tests/gcs_emulator.py`) with one bucket; yields its URL."""
  port = _free_port()
  server = subprocess.Popen(
    [sys.executable, "-m", "tests.gcs_emulator", str(port), BUCKET],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  try:
    assert server.stdout.readline().startswith("listening"), "the GCS emulator did not start"
    yield f"http://127.0.0.1:{port}"
  finally:
    server.kill()
    server.wait()


def _objects(url: str, prefix: str) -> list[str]:
  query = urllib.parse.urlencode({"prefix": prefix})
  with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{query}") as r:
    return sorted(item["name"] for item in json.load(r).get("items", []))


def _read(url: str, name: str) -> str:
  with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media") as r:
    return r.read().decode()


def _python(gcs: str, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  """`python -c script args` in a process whose GCS clients all reach the emulator at `gcs`."""
  return subprocess.run(
    [sys.executable, "-c", script, *args],
    cwd=ROOT,
    env=_emulator_env(gcs),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def _emulator_env(url: str) -> dict:
  return {
    **os.environ,
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "NO_GCE_CHECK": "true",
    "PYTHONPATH": ROOT,
  }


@needs_fmnist
def test_gs_workdir_survives_sigterm_and_resumes_exactly(tmp_path, gcs, uninterrupted_run):
  config, local_dir, straight = uninterrupted_run

  config_file = write_config_file(tmp_path / "cfg", config)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  args = ["--config", config_file, "--workdir", f"gs://{BUCKET}/run"]
  env = _emulator_env(gcs)
  first = run_main(args, cwd=cwd, env=env)
  for line in first.stdout:
    if line.startswith("step 6/16"):
      first.send_signal(signal.SIGTERM)
      break
  out, err = first.communicate(timeout=300)
  assert first.returncode == 128 + signal.SIGTERM, err[-3000:]
  stopped = {int(n.split("/")[2]) for n in _objects(gcs, "run/checkpoints/") if n.count("/") > 3}
  assert stopped and 6 <= max(stopped) < 16, stopped

  second = run_main(args, cwd=cwd, env=env)
  out, err = second.communicate(timeout=300)
  assert second.returncode == 0, err[-3000:]
  assert f"resumed from the checkpoint at step {max(stopped)}" in out

  names = _objects(gcs, "run/")
  assert "run/config.json" in names and json.loads(_read(gcs, "run/config.json"))["num_train_steps"] == 16
  assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)
  steps = {n.split("/")[2] for n in names if n.startswith("run/checkpoints/")}
  assert steps == {"12", "16"}, steps  # keep_checkpoints=2: older steps were deleted from the bucket.
  remote = [json.loads(line) for line in _read(gcs, "run/metrics.jsonl").splitlines()]
  assert without_timing(remote) == without_timing(read_metrics(local_dir))  # Both segments.
  final = [r for r in remote if "eval_accuracy" in r][-1]
  assert (final["eval_accuracy"], final["eval_loss"]) == (straight["eval_accuracy"], straight["eval_loss"])
  assert "run/lock.json" not in names  # Released by both segments, the interrupted one included.
  assert os.listdir(cwd) == []  # Nothing leaked onto the local disk (e.g. a `gs:` directory).


def test_superseded_metric_lines_move_on_gs_too(gcs):
  """A resume's superseded lines on an object store: both objects are rewritten whole."""
  script = (
    "from etils import epath\nfrom nin_jax.run import reporting, workdir\n"
    f"log = reporting.MetricsLog(workdir.resolve('gs://{BUCKET}/m') / 'metrics.jsonl')\n"
    "for step in (2, 4, 6, 8):\n  log.append({'step': step})\n"
    "print(log.supersede_after(4))\nlog.append({'step': 6, 'again': True})\n"
  )
  proc = _python(gcs, script)
  assert proc.returncode == 0 and proc.stdout.strip() == "2", proc.stderr[-2000:]
  assert [json.loads(line) for line in _read(gcs, "m/metrics.jsonl").splitlines()] == [
    {"step": 2},
    {"step": 4},
    {"step": 6, "again": True},
  ]
  assert [json.loads(line) for line in _read(gcs, "m/metrics.superseded.jsonl").splitlines()] == [
    {"step": 6},
    {"step": 8},
  ]


def test_the_emulator_honours_generation_preconditions_as_gcs_documents(gcs):
  """ifGenerationMatch on uploads (simple and resumable) and deletes: 0 means "must not
  exist", a mismatch is 412 and changes nothing, generations grow with every write."""
  script = f"""
from google.api_core.exceptions import PreconditionFailed
from google.cloud import storage
blob = storage.Client(project="p").bucket("{BUCKET}").blob("c/lock.json")
blob.upload_from_string("a", if_generation_match=0)
first = blob.generation
for attempt in [lambda: blob.upload_from_string("b", if_generation_match=0),
                lambda: blob.upload_from_string("b", if_generation_match=first + 1),
                lambda: blob.delete(if_generation_match=first + 1)]:
  try:
    attempt(); print("proceeded")
  except PreconditionFailed as e:
    print("412", e.code)
blob.upload_from_string("c", if_generation_match=first)
second = blob.generation
print("grew", second > first, blob.download_as_text())
blob.chunk_size = 256 * 1024  # A resumable upload: the precondition is checked when it completes.
try:
  blob.upload_from_string("x" * (600 * 1024), if_generation_match=first)
except PreconditionFailed:
  print("resumable 412")
blob.reload()
print("after", blob.generation == second, blob.download_as_text())
blob.delete(if_generation_match=second)
print("deleted", not blob.exists())
"""
  proc = _python(gcs, script)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == [
    "412 412",
    "412 412",
    "412 412",
    "grew True c",
    "resumable 412",
    "after True c",
    "deleted True",
  ]


# A TCP proxy to the emulator that holds every chunk a client sends for `delay` seconds: a
# loaded network or a retried upload, for one of two runs racing for one workdir.
_RACE = """
import json, socket, sys, threading, time
from google.cloud import storage
from etils import epath
from nin_jax.run import lock

emulator_port, trials, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])

def pipe(source, sink, wait):
  try:
    while data := source.recv(65536):
      time.sleep(wait)
      sink.sendall(data)
  except OSError:
    pass
  finally:
    sink.close()

def serve(listener):
  while True:
    client, _ = listener.accept()
    upstream = socket.create_connection(("127.0.0.1", emulator_port))
    threading.Thread(target=pipe, args=(client, upstream, delay), daemon=True).start()
    threading.Thread(target=pipe, args=(upstream, client, 0), daemon=True).start()

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
threading.Thread(target=serve, args=(listener,), daemon=True).start()
slow_endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"

def contend(workdir, slow, outcome):
  held = lock.WorkdirLock(workdir, say=lambda message: None)
  if slow:  # The same lock, its requests through the slow proxy.
    client = storage.Client(project="p", client_options={"api_endpoint": slow_endpoint})
    held._object._blob = client.bucket(held._object._blob.bucket.name).blob(held._object._blob.name)
  try:
    outcome[slow] = held.__enter__()
  except lock.WorkdirInUse:
    outcome[slow] = None

for trial in range(trials):
  workdir, outcome = epath.Path(f"gs://nin-test/race{trial}"), {}
  threads = [threading.Thread(target=contend, args=(workdir, slow, outcome)) for slow in (False, True)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  holders = [held for held in outcome.values() if held is not None]
  print(len(holders), flush=True)
  for held in holders:
    held.__exit__(None, None, None)
"""


def test_two_runs_racing_for_a_gs_workdir_never_both_hold_it(gcs):
  port = urllib.parse.urlparse(gcs).port
  proc = _python(gcs, _RACE, str(port), "20", "0.3", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["1"] * 20  # Exactly one holder in every trial.


def test_a_gs_lock_taken_over_behind_a_runs_back_is_lost_at_its_next_heartbeat(gcs):
  script = f"""
import time
from google.cloud import storage
from etils import epath
from nin_jax.run import lock
lock.HEARTBEAT_SECONDS = 0.1
said = []
held = lock.WorkdirLock(epath.Path("gs://{BUCKET}/taken"), say=said.append).__enter__()
storage.Client(project="p").bucket("{BUCKET}").blob("taken/lock.json").upload_from_string('{{"token": "other"}}')
time.sleep(1.0)
held.__exit__(None, None, None)
print(held.lost, said[0].startswith("error: another run took over gs://{BUCKET}/taken"))
print(storage.Client(project="p").bucket("{BUCKET}").blob("taken/lock.json").download_as_text())
"""
  proc = _python(gcs, script)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == ["True True", '{"token": "other"}']  # The new holder's lock stays.


def test_an_unreadable_gs_lock_is_replaced_with_a_warning(gcs):
  """Uploads are atomic, so a lock.json that is not JSON is damaged, not half-written: it is
  replaced (by generation, as a stale lock is), where it used to recurse until Python's limit."""
  script = f"""
from google.cloud import storage
from etils import epath
from nin_jax.run import lock
storage.Client(project="p").bucket("{BUCKET}").blob("damaged/lock.json").upload_from_string("{{not json")
said = []
with lock.WorkdirLock(epath.Path("gs://{BUCKET}/damaged"), say=said.append):
  print(said)
"""
  proc = _python(gcs, script)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == [f"['warning: replacing the unreadable gs://{BUCKET}/damaged/lock.json.']"]
