"""End-to-end training on real Fashion-MNIST subsets: sharding, resume, eval, guard rails."""

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
from flax import nnx

from nin_jax import configs, datasets, errors, input_pipeline, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(datasets.DEBIAN_FASHION_MNIST),
    reason="needs Debian's dataset-fashion-mnist (bash setup.sh installs it)")


def small_config(**overrides):
  c = configs.default_config()
  c.update(dict(dataset="fashion_mnist", model="nin_mnist", train_examples=512, eval_examples=300,
                batch_size=32, eval_batch_size=64, num_train_steps=8, optimizer="adamw",
                learning_rate=2e-3, schedule="cosine", warmup_epochs=0.0, log_every_steps=2,
                checkpoint_every_steps=4, eval_every_steps=100, seed=0))
  c.update(overrides)
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def without_timing(records):
  return [{k: v for k, v in r.items() if k != "images_per_sec"} for r in records]


def flat_params(workdir, config):
  model, _ = train.load_model(str(workdir), config)
  params = nnx.state(model, nnx.Param)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


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


@needs_fmnist
def test_short_run_on_real_fashion_mnist_learns(tmp_path, capsys):
  config = small_config(train_examples=2048, num_train_steps=64, log_every_steps=16, checkpoint_every_steps=16,
                        eval_examples=1000, eval_batch_size=200)
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


@needs_fmnist
def test_eval_counts_every_example_once(tmp_path):
  # 300 examples in batches of 64: four full batches and one padded to 64 with 44 masked rows.
  config = small_config(num_train_steps=2, eval_examples=300, eval_batch_size=64)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["eval_examples"] == 300

  # The same accuracy computed directly, one example at a time, from the final parameters.
  arrays = datasets.load_arrays("fashion_mnist")
  _, eval_x = input_pipeline.preprocess(arrays.train_images[:512], arrays.eval_images[:300], "standardize")
  model, step = train.load_model(str(tmp_path), config)
  assert step == 2
  predictions = np.concatenate([np.argmax(model(eval_x[i:i + 50]), -1) for i in range(0, 300, 50)])
  assert result["eval_accuracy"] == pytest.approx(np.mean(predictions == arrays.eval_labels[:300]), abs=1e-9)


def _run_main(args, **kwargs):
  return subprocess.Popen([sys.executable, "-m", "nin_jax.main", "--nofast_cpu_dot", *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _config_file(tmp_path, config) -> str:
  """The exact config as a config file, so a subprocess trains what the test trains."""
  path = tmp_path / "config.py"
  path.write_text("import ml_collections\n\n\ndef get_config():\n"
                  f"  return ml_collections.ConfigDict({config.to_dict()!r})\n")
  return str(path)


@needs_fmnist
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
  config = small_config(num_train_steps=40, checkpoint_every_steps=100, eval_every_steps=20)
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))

  workdir = str(tmp_path / "resumed")
  proc = _run_main(["--config", _config_file(tmp_path, config), "--workdir", workdir])
  # SIGTERM once training has visibly started; the run must save and exit non-zero.
  for line in proc.stdout:
    if line.startswith("step 6/40"):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err
  assert "checkpoint saved" in err
  stopped_at = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert 6 <= stopped_at < 40

  resumed = train.train_and_evaluate(config, workdir)
  assert resumed == straight
  a, b = flat_params(tmp_path / "straight", config), flat_params(workdir, config)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # Bitwise.
  assert without_timing(read_metrics(workdir)) == without_timing(read_metrics(tmp_path / "straight"))


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
  model, step = train.load_model(str(tmp_path), config)  # The damaged step 8 was rewritten.
  assert step == 12 and sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "4", "8"]


@needs_fmnist
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = small_config(optimizer="sgd", learning_rate=1e6, schedule="constant", num_train_steps=50,
                        checkpoint_every_steps=1)
  with pytest.raises(errors.TrainingDiverged, match=r"at step (\d+)") as info:
    train.train_and_evaluate(config, str(tmp_path))
  bad_step = int(info.value.args[0].split("at step ")[1].split(";")[0])
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert saved and saved[-1] == bad_step - 1
  params = flat_params(tmp_path, config)
  assert all(np.isfinite(v).all() for v in params.values())


@needs_fmnist
def test_stuck_loss_warns_with_the_fix(tmp_path, capsys):
  # A huge SGD step kills every ReLU: logits are all 0 and the loss sits at ln(10).
  config = small_config(optimizer="sgd", learning_rate=1.0, schedule="constant", num_train_steps=30,
                        stuck_loss_steps=10, checkpoint_every_steps=100)
  train.train_and_evaluate(config, str(tmp_path))
  losses = [r["train_loss"] for r in read_metrics(tmp_path) if "train_loss" in r]
  assert losses[-1] == pytest.approx(math.log(10), abs=1e-3)
  assert "the last ReLU has likely died" in capsys.readouterr().out


@pytest.mark.parametrize("overrides,message", [
    (dict(dataset="imagenet21k"), "Unknown dataset 'imagenet21k'; choose one of"),
    (dict(model="resnet50"), "Unknown model 'resnet50'; choose one of"),
    (dict(head="mlp"), "Unknown head 'mlp'; choose one of"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(batch_size=12), "not divisible by the 8 devices"),
    (dict(learning_rate=float("nan")), "learning_rate must be a positive finite number"),
    (dict(learning_rate=float("inf")), "learning_rate must be a positive finite number"),
    (dict(augment="mixup"), "Unknown augment 'mixup'"),
])
def test_bad_config_values_are_rejected(tmp_path, overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    train.train_and_evaluate(small_config(**overrides), str(tmp_path))


def test_unknown_config_key_is_rejected(tmp_path):
  config = small_config()
  config.lerning_rate = 0.1
  with pytest.raises(errors.ConfigError, match="Unknown config key.*lerning_rate"):
    train.train_and_evaluate(config, str(tmp_path))


def test_workdir_that_is_a_file_is_rejected(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(errors.ConfigError, match="is a file"):
    train.train_and_evaluate(small_config(), str(path))
  with pytest.raises(errors.ConfigError, match="cannot be written"):
    train.train_and_evaluate(small_config(), str(path / "sub"))


def test_missing_data_set_says_how_to_get_it(tmp_path):
  config = small_config(dataset="mnist", data_dir=str(tmp_path / "empty"), download=False)
  with pytest.raises(errors.DataError, match="tfds build mnist"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  config = small_config(data_dir=str(tmp_path / "empty"), download=False)
  with pytest.raises(errors.DataError, match="apt-get install dataset-fashion-mnist"):
    train.train_and_evaluate(config, str(tmp_path / "w"))


@pytest.mark.parametrize("args,message,code", [
    (["--config", "experiments/nope.py"], "nope.py", 2),
    (["--config", "experiments/nin_fashion_mnist.py", "--config.lerning_rate=1"], "lerning_rate", 2),
    (["--config", "experiments/nin_fashion_mnist.py", "--config.model=resnet"], "Unknown model 'resnet'", 2),
    (["--config", "experiments/nin_fashion_mnist.py", "--config.learning_rate=nan"],
     "learning_rate must be a positive finite number", 2),
])
def test_command_line_errors_are_one_line_without_traceback(tmp_path, args, message, code):
  proc = _run_main([*args, "--workdir", str(tmp_path)])
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == code, err
  assert "Traceback" not in err
  error_lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and message in error_lines[0], err


@pytest.mark.parametrize("dataset,model,extra", [
    ("cifar10", "nin_cifar10", dict(preprocess="gcn_zca", augment="crop_flip")),
    ("svhn", "nin_svhn", dict(preprocess="lcn")),
    ("imagenet2012", "nin_imagenet", dict(image_size=64, preprocess="caffe_mean", augment="caffe",
                                          train_examples=40)),
    ("imagenet2012", "nin_imagenet", dict(image_size=64, augment="inception", train_examples=40,
                                          dtype="bfloat16")),
])
def test_tfds_pipelines_train_end_to_end_on_mock_data(tmp_path, dataset, model, extra):
  config = small_config(**{**dict(dataset=dataset, model=model, batch_size=8, eval_batch_size=8,
                                  train_examples=0, eval_examples=20, num_train_steps=3,
                                  checkpoint_every_steps=2), **extra})
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(config, str(tmp_path))
  assert result["eval_examples"] == 20
  assert 0.0 <= result["eval_accuracy"] <= 1.0
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records if "train_loss" in r] == [2, 3]
  assert all(math.isfinite(r["train_loss"]) for r in records if "train_loss" in r)
  if dataset == "imagenet2012":
    assert "eval_top5_accuracy" in result


def test_synthetic_data_trains(tmp_path):
  config = small_config(dataset="synthetic", model="nin_cifar10", batch_size=8, num_train_steps=2,
                        eval_examples=16, eval_batch_size=8)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["eval_examples"] == 16


@needs_fmnist
def test_two_hosts_match_one_host(tmp_path):
  """Two processes of 4 CPU devices each (jax.distributed over gloo) train like one of 8."""
  config = small_config(num_train_steps=4, log_every_steps=1, optimizer="sgd", learning_rate=0.02,
                        checkpoint_every_steps=2)
  train.train_and_evaluate(config, str(tmp_path / "one"))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  port = 20000 + os.getpid() % 20000
  workdir = str(tmp_path / "two")
  config_file = _config_file(tmp_path, config)
  procs = [_run_main(["--config", config_file, "--workdir", workdir, f"--coordinator_address=127.0.0.1:{port}",
                      "--num_processes=2", f"--process_id={i}"], env=env) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "on 8 cpu device(s), 2 host(s)" in outputs[0][0]
  assert "eval at" not in outputs[1][0] and "step 1/4" not in outputs[1][0]  # Only host 0 reports.
  one, two = read_metrics(tmp_path / "one"), read_metrics(workdir)
  np.testing.assert_allclose([r["train_loss"] for r in two if "train_loss" in r],
                             [r["train_loss"] for r in one if "train_loss" in r], rtol=0, atol=1e-5)
  assert [r["eval_examples"] for r in two if "eval_examples" in r] == [300]
  p1, p2 = flat_params(tmp_path / "one", config), flat_params(workdir, config)
  for key in p1:
    np.testing.assert_allclose(p2[key], p1[key], rtol=0, atol=1e-5, err_msg=key)
