"""python -m nin_jax.benchmark: its numbers are consistent with each other and with the model."""

import json
import os
import re
import subprocess
import sys

import pytest

from nin_jax import benchmark
from nin_jax.model import models
from tests.helpers import ROOT, needs_fmnist


def _benchmark(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "nin_jax.benchmark", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], pytest.param(["--input"], marks=needs_fmnist)])
def test_benchmark_prints_consistent_measurements_of_the_trainers_steps(extra):
  proc = _benchmark(
    "--model", "nin_mnist", "--batch_size", "16", "--steps", "2", "--repeats", "2", "--warmup", "1", *extra
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [r["measure"] for r in rows] == ["train_step", "eval_step"]
  mult_adds = models.total_mult_adds(models.abstract_model("nin_mnist"))
  for row, flops_per_mult_add in zip(rows, (6, 2)):
    assert row["mult_adds_per_image"] == mult_adds == 50_699_712
    assert row["devices"] == 8 and row["backend"] == "cpu"  # Every device of conftest's 8,
    assert row["layers"] == "xla"  # where XLA's kernels stay (tests/test_onednn.py has one device).
    assert row["input"] == ("fashion_mnist" if extra else "synthetic")
    assert row["step_seconds_min"] <= row["step_seconds_median"] <= row["step_seconds_max"]
    assert row["images_per_sec"] == pytest.approx(16 / row["step_seconds_median"])
    assert row["flops_per_sec"] == pytest.approx(flops_per_mult_add * mult_adds * row["images_per_sec"])
    assert row["fraction_of_matmul_peak"] == pytest.approx(row["flops_per_sec"] / row["matmul_peak_flops_per_sec"])
    assert 0 < row["fraction_of_matmul_peak"] < 2 and row["compile_seconds"] > 0
  assert "train_step" in proc.stdout.splitlines()[-3] and "layers on XLA; matmul peak" in proc.stdout.splitlines()[-1]


def test_benchmark_user_errors_are_one_line():
  proc = _benchmark("--model", "nin_mnist", "--batch_size", "12")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: batch_size 12 is not divisible by the 8 devices")


@pytest.mark.slow
@pytest.mark.parametrize(
  "name,image_size", [("nin_cifar10", 0), ("nin_cifar100", 0), ("nin_svhn", 0), ("nin_imagenet", 99)]
)
def test_benchmark_flops_come_from_each_models_table(name, image_size):
  """FLOP/s = 2 per multiply-add of the model's own table at the benchmarked size (x3 to train)."""
  proc = _benchmark(
    "--model",
    name,
    "--batch_size",
    "8",
    "--steps",
    "1",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--image_size",
    str(image_size),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  mult_adds = models.total_mult_adds(models.abstract_model(name), image_size or None)
  train, evaluation = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  for row, flops_per_mult_add in ((train, 6), (evaluation, 2)):
    assert row["mult_adds_per_image"] == mult_adds
    assert row["flops_per_sec"] == pytest.approx(flops_per_mult_add * mult_adds * row["images_per_sec"])


def test_performance_tables_are_consistent_with_the_models():
  """Each row's ratio and peak shares (docs/performance.md) follow from its own images/s and the model's table."""
  section = open(os.path.join(ROOT, "docs", "performance.md"), encoding="utf-8").read()
  rows = [line for line in section.splitlines() if line.startswith("| `nin_")]
  assert len(rows) == 18  # Three CPUs (a Zen 4 and an AVX2 Zen 3 EPYC, an AMX Xeon): two dtypes, three models each
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    name, batch = re.fullmatch(r"`(\w+)`, (\d+)", cells[0]).groups()
    project, torch, ratio = float(cells[1]), float(cells[2]), float(cells[3])
    project_share, torch_share = (float(c.rstrip("%")) / 100 for c in cells[4:6])
    peak = float(cells[6].split()[0]) * 1e9
    assert ratio == pytest.approx(project / torch, abs=0.005)
    mult_adds = models.total_mult_adds(models.abstract_model(name))
    for images_per_sec, share in ((project, project_share), (torch, torch_share)):
      assert 6 * mult_adds * images_per_sec / peak == pytest.approx(share, abs=0.01)


def test_benchmark_dtype_names_are_the_models():
  assert benchmark.DTYPE_NAMES == tuple(models.DTYPES)
