"""A `gcloud` for testing launch/tpu.sh without a cloud: records every call, answers from a script.

Installed first on PATH by `install(directory)`. Each call appends its argv as a JSON line to
FAKE_GCLOUD_LOG. FAKE_GCLOUD_ANSWERS names a JSON file {substring: [answer, ...]}: the first
substring found in the joined argv takes the next answer of its list (the last one repeats);
an answer is {"out": text, "rc": code}. Unmatched calls print nothing and succeed.

With FAKE_GCLOUD_WORKERS=DIR, the TPU's workers are the directories DIR/worker*: `tpu-vm ssh
--worker=all|K --command=C` runs C with bash in each chosen worker (HOME = that directory, and
TPU_LOCKFILE inside it), `tpu-vm scp SRC NAME:DEST` copies SRC to each worker's DEST; the
exit status is the worst worker's, as gcloud's is.
"""

import glob
import json
import os
import shutil
import subprocess
import sys


def install(directory) -> str:
  """Writes a `gcloud` executable into `directory` (to go first on PATH); returns its path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "gcloud")
  with open(path, "w") as f:
    f.write(f"#!/bin/sh\nexec {sys.executable} {os.path.abspath(__file__)} \"$@\"\n")
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


def _workers(argv: list[str]) -> list[str]:
  workers = sorted(glob.glob(os.path.join(os.environ["FAKE_GCLOUD_WORKERS"], "worker*")))
  chosen = _flag(argv, "worker") or "0"
  return workers if chosen == "all" else [workers[int(chosen)]]


def _on_workers(argv: list[str]) -> int:
  worst = 0
  for worker in _workers(argv):
    env = {**os.environ, "HOME": worker, "TPU_LOCKFILE": os.path.join(worker, "libtpu_lockfile")}
    if "ssh" in argv:
      status = subprocess.run(["bash", "-c", _flag(argv, "command")], cwd=worker, env=env, check=False).returncode
    else:  # scp SRC NAME:DEST
      source, target = [a for a in argv[argv.index("scp") + 1:] if not a.startswith("--")][:2]
      shutil.copy(source, os.path.join(worker, target.split(":", 1)[1]))
      status = 0
    worst = max(worst, status)
  return worst


def main(argv: list[str]) -> int:
  with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\n")
  answer = _answer(argv)
  if answer is not None:
    sys.stdout.write(answer.get("out", ""))
    return answer.get("rc", 0)
  if os.environ.get("FAKE_GCLOUD_WORKERS") and ("ssh" in argv or "scp" in argv):
    return _on_workers(argv)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
