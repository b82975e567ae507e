"""End-to-end training on real Fashion-MNIST subsets: sharding, resume, eval, guard rails."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from nin_jax import analysis, errors, train
from nin_jax import job as job_lib
from nin_jax.data import datasets, input_pipeline
from nin_jax.run import workdir as workdir_lib
from tests.helpers import (
  ROOT,
  cpu_transfer_guard,
  flat_params,
  needs_fmnist,
  predict,
  read_metrics,
  run_main,
  run_main_until,
  small_config,
  without_timing,
  write_config_file,
)
from tests.imagenet_files import write_ilsvrc_tars


@pytest.mark.slow
@needs_fmnist
def test_sharded_training_matches_one_device(tmp_path):
  # SGD (the paper's optimizer): its update is linear in the gradient. Adam divides by
  # sqrt(v), which turns summation-order noise in near-zero gradients into ~3e-5 steps.
  config = small_config(num_train_steps=5, log_every_steps=1, optimizer="sgd", learning_rate=0.02)
  train.train_and_evaluate(config, str(tmp_path / "one"), devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(tmp_path / "eight"), devices=jax.devices()[:8])
  one, eight = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "eight")
  losses = lambda recs: [r["train_loss"] for r in recs if "train_loss" in r]
  assert len(losses(one)) == 5
  np.testing.assert_allclose(losses(eight), losses(one), rtol=0, atol=1e-5)
  p1, p8 = flat_params(tmp_path / "one", config), flat_params(tmp_path / "eight", config)
  assert p1.keys() == p8.keys()
  for key in p1:
    np.testing.assert_allclose(p8[key], p1[key], rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.slow
@needs_fmnist
def test_short_run_on_real_fashion_mnist_learns(tmp_path, capsys):
  config = small_config(
    train_examples=2048,
    num_train_steps=64,
    log_every_steps=16,
    checkpoint_every_steps=16,
    eval_examples=1000,
    eval_batch_size=200,
  )
  # The 60 steps that neither log nor save must not move a single value to the host.
  with cpu_transfer_guard(), jax.transfer_guard_device_to_host("disallow_explicit"):
    result = train.train_and_evaluate(config, str(tmp_path))
  records = read_metrics(tmp_path)
  losses = [r["train_loss"] for r in records if "train_loss" in r]
  # Measured: 2.308 -> 1.778 and 38.2% (seed 0); dropout makes the first epoch slow.
  assert losses[-1] < 0.85 * losses[0]
  assert result["eval_examples"] == 1000
  assert result["eval_accuracy"] > 0.3  # Chance is 0.1.
  out = capsys.readouterr().out
  assert "step 64/64 100.0%" in out and "img/s" in out and "ETA" in out
  assert os.path.exists(tmp_path / "config.json")
  assert os.listdir(tmp_path / "tensorboard")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["32", "48", "64"]  # keep_checkpoints=3


@pytest.mark.slow
@needs_fmnist
def test_eval_counts_every_example_once(tmp_path):
  # 300 examples in batches of 64: four full batches and one padded to 64 with 44 masked rows.
  config = small_config(num_train_steps=2, eval_examples=300, eval_batch_size=64)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["eval_examples"] == 300

  # The same accuracy computed directly, all 300 examples in one batch, from the final parameters.
  arrays = datasets.load_arrays("fashion_mnist")
  _, eval_x = input_pipeline.preprocess(arrays.train_images[:512], arrays.eval_images[:300], "standardize")
  model, step = analysis.load_model(str(tmp_path), config)
  assert step == 2
  predictions = np.argmax(predict(model, eval_x), -1)
  assert result["eval_accuracy"] == pytest.approx(np.mean(predictions == arrays.eval_labels[:300]), abs=1e-9)


@pytest.mark.slow
@needs_fmnist
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, capsys, uninterrupted_run):
  config, straight_dir, straight = uninterrupted_run
  workdir = str(tmp_path / "resumed")
  # SIGTERM once training has visibly started; the run must save and exit non-zero.
  code, _, err = run_main_until(["--config", write_config_file(tmp_path, config), "--workdir", workdir], "step 6/16")
  assert code == 128 + signal.SIGTERM, err
  assert "checkpoint saved" in err
  stopped_at = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert 6 <= stopped_at < 16
  assert not os.path.exists(os.path.join(workdir, workdir_lib.FINAL_FILE))  # Not finished: no final.json.

  resumed = train.train_and_evaluate(config, workdir)
  assert resumed == straight
  with open(os.path.join(workdir, workdir_lib.FINAL_FILE)) as f:
    assert json.load(f) == {"step": 16, **straight}
  a, b = flat_params(straight_dir, config), flat_params(workdir, config)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # Bitwise.
  assert without_timing(read_metrics(workdir)) == without_timing(read_metrics(straight_dir))

  # A rerun of the finished run trains nothing, evaluates nothing and adds no line.
  lines = read_metrics(workdir)
  assert train.train_and_evaluate(config, workdir) == straight
  assert "nothing left to train" in capsys.readouterr().out
  assert read_metrics(workdir) == lines


@pytest.mark.slow
@needs_fmnist
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
  config = small_config(num_train_steps=8, checkpoint_every_steps=4)
  train.train_and_evaluate(config, str(tmp_path))
  state_dir = tmp_path / "checkpoints" / "8" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  config.num_train_steps = 12
  train.train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert "checkpoint at step 8 could not be restored" in out
  assert "resumed from the checkpoint at step 4" in out
  model, step = analysis.load_model(str(tmp_path), config)  # The damaged step 8 was rewritten.
  assert step == 12 and sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "4", "8"]


@pytest.mark.slow
@needs_fmnist
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = small_config(
    optimizer="sgd", learning_rate=1e6, schedule="constant", num_train_steps=50, checkpoint_every_steps=1
  )
  with pytest.raises(errors.TrainingDiverged, match=r"at step (\d+)") as info:
    train.train_and_evaluate(config, str(tmp_path))
  bad_step = int(info.value.args[0].split("at step ")[1].split(";")[0])
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert saved and saved[-1] == bad_step - 1
  params = flat_params(tmp_path, config)
  assert all(np.isfinite(v).all() for v in params.values())


@pytest.mark.slow
@needs_fmnist
def test_stuck_loss_warns_with_the_fix(tmp_path, capsys):
  # A huge SGD step kills every ReLU: logits are all 0 and the loss sits at ln(10).
  config = small_config(
    optimizer="sgd",
    learning_rate=1.0,
    schedule="constant",
    num_train_steps=30,
    stuck_loss_steps=10,
    checkpoint_every_steps=100,
  )
  train.train_and_evaluate(config, str(tmp_path))
  losses = [r["train_loss"] for r in read_metrics(tmp_path) if "train_loss" in r]
  assert losses[-1] == pytest.approx(math.log(10), abs=1e-3)
  assert "the last ReLU has likely died" in capsys.readouterr().out


@pytest.mark.parametrize(
  "args,message,code",
  [
    (["--config", "experiments/nope.py"], "nope.py", 2),
    (["--config", "experiments/nin_fashion_mnist.py", "--config.lerning_rate=1"], "lerning_rate", 2),
    (["--config", "experiments/nin_fashion_mnist.py", "--config.model=resnet"], "Unknown model 'resnet'", 2),
    (
      ["--config", "experiments/nin_fashion_mnist.py", "--config.learning_rate=nan"],
      "learning_rate must be a positive finite number",
      2,
    ),
  ],
)
def test_command_line_errors_are_one_line_without_traceback(tmp_path, args, message, code):
  proc = run_main([*args, "--workdir", str(tmp_path)])
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == code, err
  assert "Traceback" not in err
  error_lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and message in error_lines[0], err


@pytest.mark.slow
@pytest.mark.parametrize(
  "dataset,model,extra",
  [
    ("cifar10", "nin_cifar10", dict(preprocess="gcn_zca", augment="crop_flip")),
    ("svhn", "nin_svhn", dict(preprocess="lcn")),
    ("imagenet2012", "nin_imagenet", dict(image_size=64, preprocess="caffe_mean", augment="caffe")),
    ("imagenet2012", "nin_imagenet", dict(image_size=64, augment="inception", dtype="bfloat16")),
  ],
)
def test_tfds_pipelines_train_end_to_end(tmp_path, dataset, model, extra):
  """CIFAR and SVHN on TFDS mock data; ImageNet prepared by TFDS from ILSVRC tars of real JPEGs."""
  if dataset == "imagenet2012":
    write_ilsvrc_tars(str(tmp_path / "manual"), per_synset=10, num_val=20)
    data = dict(
      data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"), eval_examples=0, shuffle_buffer=32
    )
    source = contextlib.nullcontext()
  else:  # Mock data needs no download; with download=True an offline machine would refuse to.
    data = dict(download=False, eval_examples=20)
    source = tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE)
  config = small_config(
    **{
      **dict(
        dataset=dataset,
        model=model,
        batch_size=8,
        eval_batch_size=8,
        train_examples=0,
        num_train_steps=3,
        checkpoint_every_steps=100,
      ),
      **data,
      **extra,
    }
  )
  workdir = tmp_path / "run"
  with source:
    result = train.train_and_evaluate(config, str(workdir))
    job = job_lib.make_job(config, str(workdir), None)
    batches = list(job.data.eval_batches())
  records = read_metrics(workdir)
  assert [r["step"] for r in records if "train_loss" in r] == [2, 3]
  assert all(math.isfinite(r["train_loss"]) for r in records if "train_loss" in r)
  # The pipeline's eval numbers are the trained model's, recomputed here example by example.
  images = np.concatenate([b.images[b.mask == 1] for b in batches])
  labels = np.concatenate([b.labels[b.mask == 1] for b in batches])
  assert result["eval_examples"] == len(labels) == 20
  logits = predict(analysis.load_model(str(workdir), config)[0], images)
  assert result["eval_accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == labels), abs=1e-9)
  losses = -jax.nn.log_softmax(logits)[np.arange(20), labels]
  assert result["eval_loss"] == pytest.approx(float(np.mean(losses)), rel=1e-4)
  if dataset == "imagenet2012":
    top5 = np.mean([label in row for label, row in zip(labels, np.argsort(-logits, -1)[:, :5])])
    assert result["eval_top5_accuracy"] == pytest.approx(top5, abs=1e-9)


def test_synthetic_data_trains(tmp_path):
  config = small_config(
    dataset="synthetic", model="nin_cifar10", batch_size=8, num_train_steps=2, eval_examples=16, eval_batch_size=8
  )
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["eval_examples"] == 16


def local_sh(tmp_path, *train_args: str, num: int = 2, devices: int = 4) -> subprocess.Popen:
  """`launch/local.sh`: `num` trainer processes joined through jax.distributed on 127.0.0.1."""
  return subprocess.Popen(
    [
      "bash",
      "launch/local.sh",
      "-n",
      str(num),
      "--devices-per-process",
      str(devices),
      "--logdir",
      str(tmp_path / "logs"),
      "--",
      "--nofast_cpu_fusions",
      *train_args,
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, "PYTHON": sys.executable},
    preexec_fn=_ctrl_c_as_from_a_terminal,
  )


def _ctrl_c_as_from_a_terminal() -> None:
  """A suite started in the background (`cmd &` in a script) inherits SIGINT ignored, and bash
  cannot trap a signal that was ignored when it started: local.sh would never see the test's
  Ctrl-C. A terminal's Ctrl-C reaches a shell whose SIGINT is at its default."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@needs_fmnist
def test_two_hosts_stop_together_and_resume_like_one_host(tmp_path, uninterrupted_run):
  """Two processes of 4 CPU devices each (launch/local.sh: jax.distributed over gloo) train
  like one of 8. SIGTERM to host 1 alone stops both at one step (JAX's preemption sync, no
  per-step collective), both save and exit 143, and the resumed pair ends like one host."""
  config, one, _ = uninterrupted_run
  workdir, config_file = str(tmp_path / "two"), write_config_file(tmp_path, config)

  pair = local_sh(tmp_path, "--config", config_file, "--workdir", workdir)
  for line in pair.stdout:  # Host 0's output, shown by local.sh.
    if line.startswith("step 4/16"):
      os.kill(int((tmp_path / "logs" / "process_1.pid").read_text()), signal.SIGTERM)
      break
  _, err = pair.communicate(timeout=300)
  assert pair.returncode == 143, err[-3000:]
  assert "process 0 exited with 143" in err and "process 1 exited with 143" in err
  stopped = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert 4 < stopped < 16, stopped

  pair = local_sh(tmp_path, "--config", config_file, "--workdir", workdir)
  out, err = pair.communicate(timeout=300)
  assert pair.returncode == 0, err[-3000:]
  assert f"resumed from the checkpoint at step {stopped}" in out
  assert "on 8 cpu device(s), 2 host(s)" in out
  host1 = (tmp_path / "logs" / "process_1.log").read_text()
  assert "eval at" not in host1 and "step 16/16" not in host1  # Only host 0 reports.
  expected, got = read_metrics(one), read_metrics(workdir)
  np.testing.assert_allclose(
    [r["train_loss"] for r in got if "train_loss" in r],
    [r["train_loss"] for r in expected if "train_loss" in r],
    rtol=0,
    atol=1e-5,
  )
  assert [r["eval_examples"] for r in got if "eval_examples" in r] == [300, 300]
  p1, p2 = flat_params(one, config), flat_params(workdir, config)
  for key in p1:
    np.testing.assert_allclose(p2[key], p1[key], rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.slow
@needs_fmnist
def test_local_sh_forwards_ctrl_c_to_every_process(tmp_path):
  config = small_config(num_train_steps=400, log_every_steps=2, checkpoint_every_steps=1000)
  group = local_sh(
    tmp_path, "--config", write_config_file(tmp_path, config), "--workdir", str(tmp_path / "w"), devices=1
  )
  for line in group.stdout:
    if line.startswith("step 2/400"):
      group.send_signal(signal.SIGINT)
      break
  _, err = group.communicate(timeout=120)
  assert group.returncode == 130, err[-3000:]
  assert "forwarding SIGINT to 2 processes" in err
  assert "process 0 exited with 130" in err and "process 1 exited with 130" in err
  assert len(os.listdir(tmp_path / "w" / "checkpoints")) == 1  # Both saved the step they stopped at.


def test_cpu_transfer_guard_catches_reads_of_device_values():
  reads = [lambda x: float(x[0]), lambda x: int(x.sum()), lambda x: jax.device_get(x), lambda x: x.tolist()]
  fresh = lambda: jax.numpy.arange(3.0) + 1  # A value read once is cached on the host.
  with cpu_transfer_guard():
    for read in reads:
      read(fresh())  # Allowed outside the guard...
      with jax.transfer_guard_device_to_host("disallow_explicit"), pytest.raises(RuntimeError, match="transfer guard"):
        read(fresh())  # ...refused inside...
      with jax.transfer_guard_device_to_host("disallow_explicit"), jax.transfer_guard_device_to_host("allow"):
        read(fresh())  # ...and allowed again where the trainer allows it (log steps).


FAKE_SRUN = r"""#!/usr/bin/env bash
# Stands in for Slurm's srun on one machine: SLURM_NTASKS copies of the command, each with the
# variables a real srun sets inside a job step (those JAX's Slurm detection reads).
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=127.0.0.1 SLURM_STEP_NUM_NODES=1 "$@" &
  pids+=("$!")
done
worst=0
for pid in "${pids[@]}"; do status=0; wait "$pid" || status=$?; ((status > worst)) && worst=$status; done
exit "$worst"
"""


@pytest.mark.slow
@needs_fmnist
def test_slurm_sbatch_joins_its_tasks_through_slurm_detection(tmp_path, uninterrupted_run):
  """launch/slurm.sbatch run as sbatch would, its srun starting 2 tasks on this machine: the
  trainer finds its peers from SLURM_* alone (--distributed) and trains like one host."""
  config, one, _ = uninterrupted_run
  (tmp_path / "bin").mkdir()
  srun = tmp_path / "bin" / "srun"
  srun.write_text(FAKE_SRUN)
  srun.chmod(0o755)
  job_id = 100000 + os.getpid() % 4096  # JAX's coordinator port: 61440 + job id % 4096.
  env = {
    **os.environ,
    "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
    "PYTHON": sys.executable,
    "SLURM_JOB_ID": str(job_id),
    "SLURM_NTASKS": "2",
    "SLURM_SUBMIT_DIR": ROOT,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
  }
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      "bash",
      os.path.join(ROOT, "launch", "slurm.sbatch"),
      "--nofast_cpu_fusions",
      "--config",
      write_config_file(tmp_path, config),
      "--workdir",
      str(workdir),
    ],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "on 8 cpu device(s), 2 host(s)" in proc.stdout
  np.testing.assert_allclose(
    [r["train_loss"] for r in read_metrics(workdir) if "train_loss" in r],
    [r["train_loss"] for r in read_metrics(one) if "train_loss" in r],
    rtol=0,
    atol=1e-5,
  )
