"""The helpers the notebooks use, on real numbers."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from nin_jax import analysis, models
from tests.helpers import small_config


def _fake_run(workdir, head: str, seed: int, eval_accuracy: float, losses=(2.0, 1.0)) -> None:
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps({"head": head, "seed": seed}))
  lines = [{"step": 10 * (i + 1), "train_loss": loss, "train_accuracy": 0.5} for i, loss in enumerate(losses)]
  lines.append({"step": 10 * len(losses), "eval_accuracy": eval_accuracy, "eval_loss": 0.3, "eval_examples": 100})
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_summary_of_fake_workdirs_has_the_right_means_and_stds(tmp_path):
  for head, seed, accuracy in [("gap", 0, 0.90), ("gap", 1, 0.92), ("fc", 0, 0.88), ("fc", 1, 0.87)]:
    _fake_run(tmp_path / head / str(seed), head, seed, accuracy)
  runs = [analysis.read_run(tmp_path / h / s, f"{h}/{s}") for h in ("gap", "fc") for s in ("1", "0")]
  train_errors = {"gap/0": 5.0, "gap/1": 6.0, "fc/0": 1.0, "fc/1": 2.0}
  rows = analysis.summarize(runs, train_errors, {"gap": (0, 100), "fc": (50, 150)})
  gap, fc = rows
  assert gap["head"] == "gap" and gap["seeds"] == [0, 1]
  assert gap["test_errors"] == pytest.approx([10.0, 8.0])
  assert gap["test_error"] == pytest.approx((9.0, 2 ** 0.5))  # Sample std of 10 and 8.
  assert gap["train_error"] == pytest.approx((5.5, 0.5 ** 0.5))
  assert gap["gap"] == pytest.approx((3.5, 2 ** 0.5 * 1.5))  # Gaps 5 and 2.
  assert fc["test_error"] == pytest.approx((12.5, 0.5 ** 0.5))
  table = analysis.markdown_table(rows, {"gap": 10.41, "fc": 11.59})
  assert table.splitlines()[2] == "| `gap` | 0 | 100 | 9.00 ± 1.41 | 10.00, 8.00 | 5.50 ± 0.71 | 3.50 ± 2.12 | 10.41 |"
  text = analysis.conclusion({"full": rows}, {"full": 1000})
  assert "lowest test error `gap` (9.00%); `gap` beats `fc` by 3.50 points, more than the seed-to-seed spread (1.58)" in text


def test_gap_logits_are_the_means_of_the_captured_class_maps():
  model = models.create_model("nin_mnist", rngs=nnx.Rngs(3))
  images = np.asarray(jax.random.normal(jax.random.key(0), (5, 28, 28, 1)))
  maps, logits = analysis.class_maps(model, images, batch_size=2)
  assert maps.shape == (5, 7, 7, 10) and maps.min() >= 0  # After the ReLU.
  np.testing.assert_allclose(maps.mean(axis=(1, 2)), logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, np.asarray(model(images)), rtol=1e-5, atol=1e-6)


def test_head_parameters_count_the_classifier_alone():
  gap_head, gap_total = analysis.head_parameters(small_config(head="gap"))
  fc_head, fc_total = analysis.head_parameters(small_config(head="fc"))
  assert gap_head == 0 and fc_head == 7 * 7 * 10 * 10 + 10  # 490 inputs to 10 classes, with biases.
  assert fc_total - gap_total == fc_head


def test_strip_volatile_keeps_outputs_and_drops_timings(tmp_path):
  path = tmp_path / "n.ipynb"
  path.write_text(json.dumps({"metadata": {"papermill": {"duration": 3.2}, "language_info": {"version": "3.11.7"}},
                              "cells": [{"metadata": {"papermill": {"start_time": "x"}, "execution": {"a": 1}},
                                         "outputs": [{"text": "42"}]}], "nbformat": 4, "nbformat_minor": 5}))
  analysis.strip_volatile(str(path))
  notebook = json.loads(path.read_text())
  assert notebook["metadata"] == {"language_info": {}}
  assert notebook["cells"][0] == {"metadata": {}, "outputs": [{"text": "42"}]}
