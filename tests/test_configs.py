"""Config validation (one-sentence errors), durations in steps or epochs, the workdir."""

import json

import pytest

from nin_jax import configs, durations, errors
from nin_jax.run import reporting, workdir
from tests.helpers import small_config


@pytest.mark.parametrize(
  "overrides,message",
  [
    (dict(dataset="imagenet21k"), "Unknown dataset 'imagenet21k'; choose one of"),
    (dict(model="resnet50"), "Unknown model 'resnet50'; choose one of"),
    (dict(head="mlp"), "Unknown head 'mlp'; choose one of: gap, fc, fc_dropout"),
    (dict(pool2="min"), "Unknown pool2 'min'; choose one of: '', max, avg"),
    (dict(optimizer="lamb"), "Unknown optimizer 'lamb'; choose one of: sgd, adamw"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(batch_size=12), "not divisible by the 8 devices"),
    (dict(learning_rate=float("nan")), "learning_rate must be a positive finite number"),
    (dict(learning_rate=float("inf")), "learning_rate must be a positive finite number"),
    (dict(augment="mixup"), "Unknown augment 'mixup' for fashion_mnist; choose one of: none, flip, crop"),
    (dict(preprocess="zca"), "Unknown preprocess 'zca' for fashion_mnist; choose one of: standardize, gcn_zca"),
    (
      dict(dataset="imagenet2012", model="nin_imagenet", augment="crop_flip"),
      "Unknown augment 'crop_flip' for imagenet2012; choose one of: none, inception, caffe",
    ),
  ],
)
def test_bad_config_values_are_rejected(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    configs.validate(small_config(**overrides), device_count=8)


def test_unknown_config_key_is_rejected():
  config = small_config()
  config.lerning_rate = 0.1
  with pytest.raises(errors.ConfigError, match="Unknown config key.*lerning_rate"):
    configs.validate(config, device_count=1)


def test_every_shipped_experiment_validates():
  import importlib

  for name, variants in [
    ("nin_fashion_mnist", [()]),
    ("nin_mnist", [()]),
    ("nin_cifar10", [("aug",), ("noaug",)]),
    ("nin_cifar100", [()]),
    ("nin_svhn", [()]),
    ("nin_imagenet", [("caffe",), ("modern",)]),
  ]:
    module = importlib.import_module(f"experiments.{name}")
    for args in variants:
      configs.validate(module.get_config(*args), device_count=1)


def test_durations_in_steps_or_epochs():
  c = small_config(num_train_steps=-1, num_epochs=2.5, warmup_epochs=0.5, decay_epochs=(1.0, 2.0))
  assert durations.steps(c, "train", 100) == 250
  assert durations.steps(c, "warmup", 100) == 50
  assert durations.steps(c, "decay", 100) == (100, 200)
  c.update(dict(num_train_steps=120_000, warmup_steps=0, decay_steps=(100_000,)))  # Steps win.
  assert durations.steps(c, "train", 100) == 120_000
  assert durations.steps(c, "warmup", 100) == 0
  assert durations.steps(c, "decay", 100) == (100_000,)
  c.update(dict(num_train_steps=-1, num_epochs=0.001))
  assert durations.steps(c, "train", 100) == 1  # At least one step.


def test_cifar10_recipe_decays_at_iteration_100k():
  from experiments import nin_cifar10

  c = nin_cifar10.get_config()
  assert durations.steps(c, "decay", 50_000 // 128) == (100_000,)
  assert durations.steps(c, "train", 50_000 // 128) == 120_000


def test_workdir_that_is_a_file_is_rejected(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(errors.ConfigError, match="is a file"):
    workdir.prepare(str(path))
  with pytest.raises(errors.ConfigError, match="cannot be written"):
    workdir.prepare(str(path / "sub"))


def test_relative_workdir_is_made_absolute_and_urls_are_left_alone(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(workdir.prepare("runs/a")) == str(tmp_path / "runs" / "a")
  assert str(workdir.resolve("gs://bucket/run")) == "gs://bucket/run"  # Not <cwd>/gs:/bucket/run.


def test_local_metrics_log_appends_and_skips_a_partial_last_line(tmp_path):
  path = workdir.resolve(tmp_path) / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2')  # A run killed mid-line.
  log = reporting.MetricsLog(path)
  assert log.records() == [{"step": 1}]
  log.append({"step": 3, "train_loss": 0.5})
  log.close()
  assert path.read_text() == '{"step": 1}\n{"step": 3, "train_loss": 0.5}\n'


def test_config_json_is_replaced_whole(tmp_path):
  path = workdir.resolve(tmp_path)
  workdir.write_config(path, {"a": 1})
  workdir.write_config(path, {"a": 2})
  assert json.loads((path / "config.json").read_text()) == {"a": 2}
  assert sorted(p.name for p in path.iterdir()) == ["config.json"]  # No temporary file left.


def test_launch_doc_tpu_batch_table_follows_the_imagenet_configs_scaling_rule():
  """Each row's learning rate is what experiments/nin_imagenet.py computes for that batch,
  and the batch divides over the slice's chips."""
  import os
  import re

  from flax import nnx

  from experiments import nin_imagenet
  from nin_jax import optim

  launch = open(os.path.join(os.path.dirname(__file__), "..", "docs", "launch.md")).read()
  rows = re.findall(r"^\| `(v[0-9a-z]+-\d+)` \| (\d+) \((\d+)\) \| (\d+) \| ([0-9.]+) \|$", launch, re.M)
  assert len(rows) == 4
  for tpu_type, chips, _, batch, lr in rows:
    config = nin_imagenet.get_config()
    config.batch_size = int(batch)
    model = configs.model_config(config)
    params = nnx.state(nnx.eval_shape(lambda: model.build(nnx.Rngs(0))), nnx.Param)  # noqa: B023
    _, schedule = optim.from_config(config, model.spec, params, num_steps=100, steps_per_epoch=10)
    assert float(schedule(0)) == pytest.approx(float(lr)), tpu_type
    assert int(batch) % int(chips) == 0, tpu_type
