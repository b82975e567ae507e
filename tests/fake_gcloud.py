"""A `gcloud` for testing launch/tpu.sh without a cloud, written from gcloud's and the TPU API's
documented behaviour rather than from what the script expects.

Installed first on PATH by `install(directory)`. Each call appends its argv as a JSON line to
FAKE_GCLOUD_LOG.

FAKE_GCLOUD_CLOUD names a JSON file holding the cloud's state, which the calls change as the
real service does:
- a queued resource goes through the TPU API's states (`QueuedResourceState.State`): created,
  it is CREATING, then ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, one state per
  `describe`; a spot preemption takes it ACTIVE -> SUSPENDING -> SUSPENDED and sends SIGTERM
  to every trainer (`preempt_after` ACTIVE describes); `delete --force` waits for the deletion
  (no --async) and removes it with its node; a SUSPENDED or FAILED one stays until deleted, and
  a create of an existing name fails with ALREADY_EXISTS;
- errors are gcloud's own texts and exit status 1: `NOT_FOUND` for a missing resource (as
  api_lib/util/exceptions.py formats an HTTP 404: "<status>: <message>"), and on the describe
  calls numbered in `describe_errors` an expired token ("There was a problem refreshing your
  current auth tokens", core/credentials/exceptions.py) or a network failure ("gcloud crashed
  (ServerNotFoundError): Unable to find the server at ...", calliope's crash handler);
- `storage ls` of a missing object fails with "One or more URLs matched no objects."
  (command_lib/storage/list_util.py); the bucket gs://B/... is the directory `bucket`/B/...;
- with FAKE_GCLOUD_WORKERS=DIR, the TPU's workers are DIR/worker*: `tpu-vm ssh --worker=all|K
  --command=C` runs C with bash in each chosen worker (HOME = that directory, TPU_LOCKFILE
  inside it) and exits with the first non-zero status, as gcloud does; `tpu-vm scp SRC
  NAME:DEST` copies. When `ssh_drops` names a substring of a command, the connection drops
  after that command ran once: gcloud's AttemptRunWithRetries (command_lib/compute/tpus/
  tpu_vm/ssh.py) then runs it again, as it does for any ssh exit 255.

FAKE_GCLOUD_ANSWERS names a JSON file {substring: [answer, ...]} for calls outside that model
(e.g. package installs): the first substring found in the joined argv takes the next answer of
its list (the last one repeats); an answer is {"out": text, "rc": code}.
"""

import fcntl
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

CREATE_PATH = ["CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]
PREEMPT_PATH = ["SUSPENDING", "SUSPENDED"]
AUTH_ERROR = (
  "ERROR: (gcloud.compute.tpus.queued-resources.describe) There was a problem refreshing your current "
  "auth tokens: ('invalid_grant: Bad Request', {'error': 'invalid_grant', 'error_description': 'Bad "
  "Request'})\nPlease run:\n\n  $ gcloud auth login\n\nto obtain new credentials.\n"
)
NETWORK_ERROR = "ERROR: gcloud crashed (ServerNotFoundError): Unable to find the server at tpu.googleapis.com\n"


def install(directory) -> str:
  """Writes a `gcloud` executable into `directory` (to go first on PATH); returns its path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "gcloud")
  with open(path, "w") as f:
    f.write(f'#!/bin/sh\nexec {sys.executable} {os.path.abspath(__file__)} "$@"\n')
  os.chmod(path, 0o755)
  return path


def _answer(argv: list[str]) -> dict | None:
  path = os.environ.get("FAKE_GCLOUD_ANSWERS")
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    answers = json.load(f)
  joined = " ".join(argv)
  for key, queue in answers.items():
    if key in joined and queue:
      answer = queue.pop(0) if len(queue) > 1 else queue[0]
      with open(path, "w") as f:
        json.dump(answers, f)
      return answer
  return None


def _flag(argv: list[str], name: str) -> str | None:
  return next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)


def _workers(argv: list[str] | None = None) -> list[str]:
  workers = sorted(glob.glob(os.path.join(os.environ.get("FAKE_GCLOUD_WORKERS", "/nonexistent"), "worker*")))
  chosen = (_flag(argv, "worker") if argv else "all") or "0"
  return workers if chosen == "all" else [workers[int(chosen)]]


def _run_on(worker: str, command: str) -> int:
  env = {**os.environ, "HOME": worker, "TPU_LOCKFILE": os.path.join(worker, "libtpu_lockfile")}
  return subprocess.run(["bash", "-c", command], cwd=worker, env=env, check=False).returncode


def _on_workers(argv: list[str], drops: list[str] | None) -> int:
  worst = 0
  for worker in _workers(argv):
    if "ssh" in argv:
      command = _flag(argv, "command")
      status = _run_on(worker, command)
      if drops:  # The connection dropped after the command ran: gcloud runs it again.
        sys.stderr.write(f"ssh: Attempting to connect to worker {os.path.basename(worker)[6:]}...\n")
        status = _run_on(worker, command)
    else:  # scp SRC NAME:DEST
      source, target = [a for a in argv[argv.index("scp") + 1 :] if not a.startswith("--")][:2]
      shutil.copy(source, os.path.join(worker, target.split(":", 1)[1]))
      status = 0
    worst = worst or status
  return worst


def _terminate_trainers() -> None:
  """A preemption or a deleted node: SIGTERM to each worker's trainer, as Cloud TPU sends."""
  for worker in _workers():
    try:
      with open(os.path.join(worker, "nin_jax_train.pid")) as f:
        os.kill(int(f.read()), signal.SIGTERM)
    except (OSError, ValueError):
      pass


def _resource(argv: list[str]) -> str:
  name = next(
    a
    for a in argv[argv.index(next(v for v in ("describe", "create", "delete") if v in argv)) + 1 :]
    if not a.startswith("-")
  )
  return f"projects/p/locations/{_flag(argv, 'zone')}/queuedResources/{name}"


def _queued_resources(argv: list[str], cloud: dict) -> int:
  verb = next(v for v in ("describe", "create", "delete") if v in argv)
  command = f"gcloud.compute.tpus.queued-resources.{verb}"
  qr = cloud.get("qr")
  if verb == "create":
    if qr is not None:
      sys.stderr.write(f"ERROR: ({command}) ALREADY_EXISTS: Resource '{_resource(argv)}' already exists\n")
      return 1
    path = cloud.get("create_path", CREATE_PATH)  # E.g. ending in FAILED: capacity that never comes.
    cloud["qr"] = {"state": path[0], "path": list(path[1:]), "active_describes": 0}
    cloud["creates"] = cloud.get("creates", 0) + 1
    return 0
  if verb == "describe":
    cloud["describes"] = cloud.get("describes", 0) + 1
    error = cloud.get("describe_errors", {}).get(str(cloud["describes"]))
    if error:
      sys.stderr.write(AUTH_ERROR if error == "auth" else NETWORK_ERROR)
      return 1
  if qr is None:
    sys.stderr.write(f"ERROR: ({command}) NOT_FOUND: Resource '{_resource(argv)}' was not found\n")
    return 1
  if verb == "delete":
    _terminate_trainers()
    cloud["qr"] = None
    return 0
  print(qr["state"])
  if qr["state"] == "SUSPENDING":
    _terminate_trainers()  # The node is being suspended: its processes get SIGTERM.
  if qr["state"] == "ACTIVE":
    qr["active_describes"] += 1
    if qr["active_describes"] == cloud.get("preempt_after"):
      cloud.pop("preempt_after")
      qr["path"] = list(PREEMPT_PATH)
  if qr["path"]:
    qr["state"] = qr["path"].pop(0)
  return 0


def _storage(argv: list[str], cloud: dict) -> int:
  bucket = cloud["bucket"]
  local = lambda url: os.path.join(bucket, url[len("gs://") :])  # noqa: E731
  urls = [a for a in argv if a.startswith("gs://")]
  if "ls" in argv:
    if not os.path.exists(local(urls[0])):
      sys.stderr.write("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.\n")
      return 1
    target = local(urls[0])
    for entry in sorted(os.listdir(target)) if os.path.isdir(target) else [target]:
      print(urls[0].rstrip("/") + "/" + entry if os.path.isdir(target) else urls[0])
    return 0
  if "cp" in argv:
    source = next(a for a in argv[argv.index("cp") + 1 :] if not a.startswith("-"))
    os.makedirs(os.path.dirname(local(urls[0])), exist_ok=True)
    shutil.copy(source, local(urls[0]))
    return 0
  if "cat" in argv:
    with open(local(urls[0])) as f:
      sys.stdout.write(f.read())
    return 0
  return 0


class _Cloud:
  """The cloud's state file, read and written under a lock: workers' log copies call gcloud
  while babysit does."""

  def __init__(self, path: str):
    self.path, self.lock = path, open(path + ".lock", "w")  # pylint: disable=consider-using-with

  def __enter__(self) -> dict:
    fcntl.flock(self.lock, fcntl.LOCK_EX)
    with open(self.path) as f:
      self.state = json.load(f)
    return self.state

  def __exit__(self, *exc):
    # Replaced whole, as a real cloud's state is never seen half-changed: a test reading it
    # without the lock while a worker's log copy still calls gcloud once read an empty file.
    with open(self.path + ".new", "w") as f:
      json.dump(self.state, f)
    os.replace(self.path + ".new", self.path)
    fcntl.flock(self.lock, fcntl.LOCK_UN)


def main(argv: list[str]) -> int:
  with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\n")
  answer = _answer(argv)
  if answer is not None:
    sys.stdout.write(answer.get("out", ""))
    return answer.get("rc", 0)
  state_file = os.environ.get("FAKE_GCLOUD_CLOUD")
  if state_file and ("queued-resources" in argv or "storage" in argv):
    with _Cloud(state_file) as cloud:
      return _queued_resources(argv, cloud) if "queued-resources" in argv else _storage(argv, cloud)
  if os.environ.get("FAKE_GCLOUD_WORKERS") and ("ssh" in argv or "scp" in argv):
    if not state_file:
      return _on_workers(argv, None)
    with _Cloud(state_file) as cloud:
      drops = [d for d in cloud.get("ssh_drops", []) if "ssh" in argv and d in (_flag(argv, "command") or "")]
      cloud["ssh_drops"] = [d for d in cloud.get("ssh_drops", []) if d not in drops]
    return _on_workers(argv, drops)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
