"""The helpers the notebooks use, on real numbers."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from nin_jax import analysis
from nin_jax.model import models


def test_gap_logits_are_the_means_of_the_captured_class_maps():
  model = models.create_model("nin_mnist", rngs=nnx.Rngs(3))
  images = np.asarray(jax.random.normal(jax.random.key(0), (5, 28, 28, 1)))
  maps, logits = analysis.class_maps(model, images, batch_size=2)
  assert maps.shape == (5, 7, 7, 10) and maps.min() >= 0  # After the ReLU.
  np.testing.assert_allclose(maps.mean(axis=(1, 2)), logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, np.asarray(model(images)), rtol=1e-5, atol=1e-6)


def test_strip_volatile_keeps_outputs_and_drops_timings(tmp_path):
  path = tmp_path / "n.ipynb"
  path.write_text(
    json.dumps(
      {
        "metadata": {"papermill": {"duration": 3.2}, "language_info": {"version": "3.11.7"}},
        "cells": [{"metadata": {"papermill": {"start_time": "x"}, "execution": {"a": 1}}, "outputs": [{"text": "42"}]}],
        "nbformat": 4,
        "nbformat_minor": 5,
      }
    )
  )
  analysis.strip_volatile(str(path))
  notebook = json.loads(path.read_text())
  assert notebook["metadata"] == {"language_info": {}}
  assert notebook["cells"][0] == {"metadata": {}, "outputs": [{"text": "42"}]}


def test_a_resumed_runs_rewritten_steps_count_once_and_the_last_line_wins(tmp_path):
  """A run killed after logging step 20 but before checkpointing it resumed from step 10 and
  logged 20 again (with other values): the reader keeps one line per step and kind."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"head": "gap", "seed": 0}))
  lines = [
    {"step": 10, "train_loss": 2.0},
    {"step": 20, "train_loss": 1.5},
    {"step": 20, "eval_accuracy": 0.5, "eval_loss": 1.0},
    {"step": 20, "train_loss": 1.4},
    {"step": 20, "eval_accuracy": 0.6, "eval_loss": 0.9},
    {"step": 30, "train_loss": 1.0},
  ]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  run = analysis.read_run(workdir)
  assert [(r["step"], r["train_loss"]) for r in run.train] == [(10, 2.0), (20, 1.4), (30, 1.0)]
  assert [(r["step"], r["eval_accuracy"]) for r in run.evals] == [(20, 0.6)]
  assert run.test_error == pytest.approx(40.0)


def test_curves_are_averaged_at_the_steps_all_runs_share():
  a = np.array([[10, 1.0], [20, 2.0], [30, 3.0]])
  b = np.array([[20, 4.0], [30, 5.0], [40, 6.0]])
  steps, mean = analysis.mean_curve([a, b])
  assert steps.tolist() == [20, 30] and mean.tolist() == [3.0, 4.0]


def test_t_interval_and_paired_test_match_values_computed_by_hand():
  # Five seeds' errors; by hand: mean 10.2, sample std 0.83666, t(0.975, 4) = 2.776445,
  # half-width 2.776445 * 0.83666 / sqrt(5) = 1.03885.
  mean, low, high = analysis.t_interval([10.0, 11.0, 9.0, 10.0, 11.0])
  assert mean == pytest.approx(10.2) and (low, high) == pytest.approx((9.16115, 11.23885), abs=1e-5)
  # One more seed's prediction interval: 2.776445 * 0.83666 * sqrt(1 + 1/5) = 2.544651.
  mean, low, high = analysis.prediction_interval([10.0, 11.0, 9.0, 10.0, 11.0])
  assert mean == pytest.approx(10.2) and (low, high) == pytest.approx((7.655349, 12.744651), abs=1e-5)
  # Paired: differences 1, 2, 0, 1, 3 -> mean 1.4, std 1.140175, t = 1.4 / (1.140175 / sqrt 5) = 2.745626;
  # with 4 degrees of freedom the two-sided p is 1 - (1.5 x - 0.5 x^3), x = t / sqrt(4 + t^2)
  # (the t(4) CDF in closed form) = 0.0516060; half-width 2.776445 * 0.509902 = 1.415700.
  difference = analysis.paired_difference([11.0, 13.0, 9.0, 11.0, 14.0], [10.0, 11.0, 9.0, 10.0, 11.0])
  assert difference["mean"] == pytest.approx(1.4)
  assert (difference["low"], difference["high"]) == pytest.approx((-0.0157, 2.8157), abs=1e-4)
  assert difference["p_value"] == pytest.approx(0.0516060, abs=1e-6)
  text = analysis.verdict("GAP", "FC", difference)
  assert text.startswith("GAP and FC are not distinguishable at this power: +1.40 points (95% CI -0.02 to +2.82")
  assert analysis.verdict("GAP", "FC", {**difference, "low": 0.1}).startswith("GAP is worse than FC")
  assert analysis.verdict("GAP", "FC", {**difference, "high": -0.1}).startswith("GAP is better than FC")
  with pytest.raises(ValueError, match="one value per seed"):
    analysis.paired_difference([1.0], [1.0, 2.0])


def test_dead_classes_are_found_in_hand_made_maps():
  maps = np.ones((4, 2, 2, 3))
  maps[..., 1] = 0.0  # Class 1's map died: zero everywhere, on every image.
  maps[2, 0, 0, 2] = 0.0  # Class 2's is zero at one position only: alive.
  logits = maps.mean(axis=(1, 2))
  logits[:, 0] += np.array([1.0, 1.0, 1.0, 1.0])  # Class 0 always wins: 1 and 2 are never predicted.
  assert analysis.dead_classes(maps, logits) == {"never_predicted": [1, 2], "zero_maps": [1]}
  assert analysis.dead_classes(None, np.eye(3)) == {"never_predicted": [], "zero_maps": []}
  maps[1:, ..., 2] = 0.0  # Class 2's map now lives on image 0 only: 1 of 4 images.
  assert analysis.alive_share(maps).tolist() == [100.0, 0.0, 25.0]


def test_fishers_exact_test_matches_the_hypergeometric_sum_by_hand():
  # 6 of 12 runs failed against 0 of 12: of the 6 failures, all 6 in the first row has probability
  # C(12,6) C(12,0) / C(24,6) = 924 / 134596; the table as extreme the other way (0 and 6) as much.
  p = 2 * math.comb(12, 6) / math.comb(24, 6)
  assert analysis.failure_rate_p_value(6, 12, 0, 12) == pytest.approx(p) == pytest.approx(0.0137300, abs=1e-7)
  assert analysis.failure_rate_p_value(3, 6, 3, 6) == pytest.approx(1.0)


def test_the_ablation_results_go_into_the_readme_verbatim(tmp_path):
  headline = "| setting | head | runs (failed) |\n|---|---|---|\n| full | `gap` | 5 (0) |\n\n- GAP is better."
  notebook = {
    "cells": [
      {"cell_type": "code", "outputs": [{"output_type": "stream", "text": "| setting | head | printed"}]},
      {"cell_type": "code", "outputs": [{"output_type": "display_data", "data": {"text/markdown": [headline]}}]},
    ]
  }
  (tmp_path / "n.ipynb").write_text(json.dumps(notebook))
  start, end = analysis.README_RESULTS
  (tmp_path / "README.md").write_text(f"# x\n\n{start}\nResults: not yet.\n{end}\n\n## Launch\n")
  analysis.copy_results_to_readme(str(tmp_path / "n.ipynb"), str(tmp_path / "README.md"))
  assert (tmp_path / "README.md").read_text() == f"# x\n\n{start}\n{headline}\n{end}\n\n## Launch\n"
