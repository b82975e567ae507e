"""The head ablation: its runs and records, and the tables and tests built from them, on
hand-made records whose numbers were worked out by hand."""

import json
import math
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import jax
import pytest
import tensorflow_datasets as tfds
from etils import epath
from flax import nnx
from scipy import stats

from nin_jax import ablation, analysis, errors
from nin_jax import ablation_report as report
from nin_jax.data import datasets
from nin_jax.model import models
from nin_jax.run import lock, preemption
from nin_jax.run import workdir as workdir_lib
from tests.helpers import small_config


def record(
  setting: str,
  head: str,
  seed: int,
  test: float | None,
  *,
  train: float = 1.0,
  failed: bool = False,
  share: float = 90.0,
  lr: float = 1e-3,
  validation: float = 12.0,
  diverged: bool = False,
) -> dict:
  """A record as `ablation` writes it and reads it back (keys sorted: step "90" after "180")."""
  return _written_and_read_back(
    {
      "name": f"{setting}-{head}-{seed}",
      "setting": setting,
      "head": head,
      "seed": seed,
      "learning_rate": lr,
      "epochs": 10.0,
      "test_error": test,
      "train_error": train,
      "true_class_strongest_map": share,
      "failed": failed,
      "diverged": diverged,
      "diagnosis": "loss is NaN at step 7" if diverged else "",
      "validation_error_by_step": {} if diverged else {"90": validation + 5, "180": validation},
      "dead_classes": {
        "never_predicted": [3] if failed and not diverged else [],
        "zero_maps": [3] if failed and not diverged else [],
      },
      "wall_seconds": 60.0,
    }
  )


def _written_and_read_back(record: dict) -> dict:
  with tempfile.TemporaryDirectory() as results:
    ablation._write(Path(results) / "runs" / f"{record['name']}.json", record)
    (read,) = ablation.records(Path(results))
  return read


RECORDS = (
  [record("full", "gap", s, e) for s, e in enumerate([10.0, 12.0, 11.0])]
  + [record("full", "gap", 3, 30.0, failed=True, share=70.0)]
  + [record("full", "fc", s, e, train=0.5, share=60.0) for s, e in enumerate([11.0, 14.0, 12.0, 13.0])]
  + [record("long-full", "gap", 0, 11.5), record("long-full", "fc", 0, 9.0)]
)


def test_summary_counts_failures_and_gives_t_intervals_over_the_healthy_runs():
  table = report.summary_table(RECORDS, "full", ["gap", "fc", "fc_dropout"], report.PAPER_CIFAR10)
  rows = table.splitlines()
  # gap: 10, 12, 11 -> mean 11, s = 1, t(0.975, 2) = 4.3027 -> half-width 2.484; the 30% run is out.
  assert rows[2] == "| `gap` | 4 (1) | 11.00 [8.52, 13.48] | 1.00 | 10.00 | 90.00 [90.00, 90.00] | 10.41 |"
  # fc: 11, 14, 12, 13 -> mean 12.5, s = 1.291, t(0.975, 3) = 3.1824 -> half-width 2.054.
  assert rows[3] == "| `fc` | 4 (0) | 12.50 [10.45, 14.55] | 0.50 | 12.00 | 60.00 [60.00, 60.00] | 11.59 |"
  assert rows[4] == "| `fc_dropout` | 0 (0) | – | – | – | – | 10.88 |"
  shares = report.map_share_table(RECORDS, "full", ["gap"]).splitlines()[2]
  assert shares == "| `gap` | 0: 90.0, 1: 90.0, 2: 90.0, 3: (70.0) | 90.00 [90.00, 90.00] |"


def test_paired_difference_uses_the_seeds_where_both_heads_are_healthy():
  d = report.paired(RECORDS, "full", "gap", "fc")
  assert d["seeds"] == [0, 1, 2]  # Seed 3's GAP run failed: its FC run has no partner.
  # Differences -1, -2, -1: mean -4/3, s = 0.5774, t = -4.0 with 2 degrees of freedom.
  assert d["mean"] == pytest.approx(-4 / 3)
  assert (d["low"], d["high"]) == pytest.approx((-4 / 3 - 1.4342, -4 / 3 + 1.4342), abs=1e-4)
  assert d["p_value"] == pytest.approx(2 * stats.t.sf(4.0, 2)) and d["p_value"] == pytest.approx(0.0572, abs=1e-4)
  assert report.paired(RECORDS, "full", "gap", "fc_dropout") is None
  text = report.conclusion(RECORDS, {"full": 50_000})
  assert (
    "- **full** (50,000 training images): `gap` and `fc` are not distinguishable at this power: -1.33 points "
    "(95% CI -2.77 to +0.10, paired t-test p = 0.0572, 3 seeds)."
  ) in text
  assert "too few paired healthy seeds to compare `gap` with `fc_dropout`" in text
  headline = report.headline_table(RECORDS, {"full": 50_000}, ["gap", "fc", "fc_dropout"]).splitlines()
  assert headline[2:] == [
    "| full (50,000 images, 10 epochs) | `gap` | 4 (1) | 11.00 [8.52, 13.48] | – | – |",
    "|  | `fc` | 4 (0) | 12.50 [10.45, 14.55] | -1.33 [-2.77, +0.10] | 0.0572 |",
    "|  | `fc_dropout` | 0 (0) | – | – | – |",
  ]
  assert "1 of 8 runs failed" in text
  table = report.paired_table(RECORDS, "full").splitlines()
  assert table[2] == "| `gap` − `fc` | 3 | -1.33 | -2.77 to +0.10 | 0.0572 |"


def test_convergence_means_the_long_run_lies_inside_the_seeds_prediction_interval():
  # gap's healthy seeds 10, 12, 11: mean 11, s 1, t(0.975, 2) = 4.302653, sqrt(1 + 1/3) =
  # 1.154701, half-width 4.968275. fc's 11, 14, 12, 13: mean 12.5, s 1.290994, t(0.975, 3) =
  # 3.182446, sqrt(1.25) = 1.118034, half-width 4.593468.
  gap = report.convergence(RECORDS, "full", "long-full", "gap")
  assert (gap["low"], gap["high"]) == pytest.approx((6.031725, 15.968275), abs=1e-5)
  assert gap["converged"] and gap["within_range"] and (gap["min"], gap["max"], gap["long"]) == (10.0, 12.0, 11.5)
  fc = report.convergence(RECORDS, "full", "long-full", "fc")
  assert fc["converged"] and not fc["within_range"]  # 9.0: below the range, inside the interval.
  fc_seeds = report.runs_of(RECORDS, "full", "fc")
  below = report.convergence(fc_seeds + [record("long-full", "fc", 0, 7.5)], "full", "long-full", "fc")
  assert not below["converged"]  # 7.5 < 12.5 - 4.593468.
  table = report.convergence_table(RECORDS, "full", "long-full", ["gap", "fc", "fc_dropout"]).splitlines()
  assert table[2:] == [
    "| `gap` | 10.00 – 12.00 | 6.03 – 15.97 | 11.50 | yes | yes |",
    "| `fc` | 11.00 – 14.00 | 7.91 – 17.09 | 9.00 | yes | no |",
    "| `fc_dropout` | – | – | – | not run | – |",
  ]


def test_the_convergence_caveat_names_failed_and_untested_heads_apart():
  heads, settings = ["gap", "fc", "fc_dropout"], {"full": 50000}
  assert report.convergence_caveat(RECORDS, settings, heads) == (
    "- Convergence not yet tested (no long run, or fewer than 3 seeds): `fc_dropout` (full)."
  )
  below = [r for r in RECORDS if r["setting"] != "long-full" or r["head"] != "fc"] + [record("long-full", "fc", 0, 7.5)]
  assert report.convergence_caveat(below, settings, heads[:2]) == "- Not converged by the test above: `fc` (full)."
  assert report.convergence_caveat(RECORDS, settings, heads[:1]) == ""


def test_earlier_lengths_are_found_in_order_and_two_seeds_get_no_verdict():
  records = [record(s, "gap", 0, 8.0) for s in ("full-e20", "full-e5", "full-e10", "fullx-e1", "small-e3", "full")]
  assert report.earlier_lengths(records, "full") == ["full-e5", "full-e10", "full-e20"]
  two = [record("full-e20", "gap", s, e) for s, e in enumerate([6.8, 6.96])] + [record("full", "gap", 0, 6.17)]
  verdict = report.convergence(two, "full-e20", "full", "gap")
  assert verdict["converged"] is None and verdict["seeds"] == 2 and not verdict["within_range"]
  row = report.convergence_table(two, "full-e20", "full", ["gap"]).splitlines()[2]
  assert row == "| `gap` | 6.80 – 6.96 | – | 6.17 | too few seeds (2) | no |"


def test_failures_are_listed_with_their_diagnosis_and_counted_per_recipe():
  records = RECORDS + [
    record("failure-old", "gap", 0, 20.0, failed=True),
    record("failure-old", "gap", 1, 8.0),
    record("grid-0.004", "gap", 0, None, failed=True, diverged=True, lr=4e-3),
  ]
  rates = report.failure_rates(records, {"old": ["failure-old"], "new": ["full", "grid-0.004"]}).splitlines()
  # Fisher, by hand: 3 failures among 7 runs, k of them in the old row's 2 with probability
  # C(2,k) C(5,3-k) / C(7,3) = 10/35, 20/35, 5/35; the observed k = 1 is the likeliest, so p = 1.
  assert rates[2:] == ["| old | 2 | 1 | 1 | 50% | – |", "| new | 5 | 2 | 1 | 40% | 1 |"]
  listed = report.failures_table(records)
  assert "| `full-gap-3` | 0.001 | 30.00 | class maps zero on every test image: [3]; never predicted: [3] |" in listed
  assert "| `grid-0.004-gap-0` | 0.004 | – | loss is NaN at step 7 |" in listed
  assert report.failures_table(RECORDS[:3]) == "No run failed."


TRACE = {
  "name": "failure-old-gap-3",
  "steps": [0, 10, 20, 30, 40],
  "learning_rate": [0.0, 1e-3, 2e-3, 3e-3, 2.5e-3],
  "alive_share": [  # [step][class]: 0 lives throughout, 1 dies at 10, 2 dies twice, 3 comes back.
    [100.0, 80.0, 90.0, 70.0],
    [100.0, 0.0, 0.0, 0.0],
    [99.0, 0.0, 50.0, 40.0],
    [98.0, 0.0, 0.0, 40.0],
    [97.0, 0.0, 0.0, 41.0],
  ],
  "reproduced": True,
  "config": {"dataset": "fashion_mnist", "num_train_steps": 40, "warmup_steps": 20},
}


def test_a_trace_says_when_each_class_map_died_and_whether_it_came_back():
  table = report.trace_table([TRACE]).splitlines()
  assert table[2:] == [
    "| `failure-old-gap-3` | yes | 1 Trouser | 80.0 | 10–40 | 10 | 0.001 |",
    "| `failure-old-gap-3` | yes | 2 Pullover | 90.0 | 10, 30–40 | 30 | 0.003 |",
    "| `failure-old-gap-3` | yes | 3 Dress | 70.0 | 10 | came back | – |",
  ]
  assert report.trace_summary([TRACE]) == (
    "2 class maps alive at initialisation (on at least 80.0% of the test images) died for good by step 30 of 40 "
    "(its warm-up ends at step 20), at a learning rate of at most 0.003; 1 died and came back."
  )
  dead_from_start = {**TRACE, "alive_share": [[0.0, *a[1:]] for a in TRACE["alive_share"]]}
  said = report.trace_summary([dead_from_start])
  assert said.endswith("; 1 was dead at initialisation and never came back; 1 died and came back.")
  assert report.trace_table([]) == "No failed run with a dead class map to trace."
  assert report.trace_summary([{**TRACE, "alive_share": [[1.0] * 4] * 5}]) == "No traced class map died."


def test_the_maps_dead_at_initialisation_are_listed_per_seed():
  alive = {"0": [100.0, 21.6, 100.0], "5": [100.0, 0.0, 4.9], "9": [0.0, 0.0, 100.0], "11": [13.6, 100.0, 1.2]}
  assert report.init_table(alive, "fashion_mnist").splitlines()[2:] == [
    "| 5 | 1 Trouser | 2 Pullover (4.9%) |",
    "| 9 | 0 T-shirt/top, 1 Trouser | – |",
    "| 11 | – | 2 Pullover (1.2%) |",
    "",
    "2 of 4 seeds start with a class map dead on every image.",
  ]
  assert report.init_table({}, "fashion_mnist") == "No seed was read at initialisation."


def test_the_learning_rate_is_chosen_on_validation_error_and_never_from_a_failed_run():
  grid = [
    record("grid-0.001", "gap", 0, 9.0, lr=1e-3, validation=11.0),
    record("grid-0.002", "gap", 0, 8.0, lr=2e-3, validation=10.0),
    record("grid-0.004", "gap", 0, 7.0, lr=4e-3, validation=6.0, failed=True),
  ]
  assert ablation.choose_learning_rate(grid) == 2e-3  # Not 4e-3 (failed), not by test error.
  said = []
  all_failed = [{**r, "failed": True} for r in grid]
  assert ablation.choose_learning_rate(all_failed, say=said.append) == 4e-3
  assert said == [
    "warning: every grid run of head 'gap' failed; chose lr 0.004 by validation error alone: "
    "widen the grid or train longer."
  ]
  with pytest.raises(ValueError, match="every grid run of head 'gap' diverged"):
    ablation.choose_learning_rate([record("grid-0.004", "gap", 0, None, failed=True, diverged=True)])
  table = report.learning_rate_table(grid, ["gap"], {"gap": 2e-3}).splitlines()
  assert table == [
    "| head | lr 0.001 | lr 0.002 | lr 0.004 |",
    "|---|---|---|---|",
    "| `gap` | 11.00 | **10.00** | failed |",
  ]


def test_a_record_read_back_from_disk_reports_its_last_steps_validation_error():
  # Written with sorted keys, the last epoch ("180") is not the last key ("90").
  healthy = record("small", "gap", 0, 11.45, train=1.98, validation=11.68)
  assert list(healthy["validation_error_by_step"]) == ["180", "90"]
  assert report.last_validation_error(healthy) == ablation.final_validation_error(healthy) == 11.68
  assert ablation.describe(healthy) == (
    "small-gap-0                validation 11.68%  test 11.45%  train  1.98%  (60 s)"
  )
  diverged = record("small", "gap", 1, None, failed=True, diverged=True)
  assert math.isnan(report.last_validation_error(diverged))
  assert ablation.final_validation_error(diverged) == float("inf")


def test_a_best_rate_at_the_grids_edge_asks_for_the_rate_beyond_it():
  def grid(*validation_errors, rates=(1e-3, 2e-3, 4e-3), failed=()):
    return [
      record(f"grid-{lr:g}", "gap", 0, e, lr=lr, validation=e, failed=lr in failed)
      for lr, e in zip(rates, validation_errors)
    ]

  # GAP's grid as measured (notebooks/results/runs/grid-*-gap-0.json): falling to the top edge.
  assert ablation.rate_beyond_the_edge(grid(8.63, 7.88, 7.45)) == 8e-3
  assert ablation.rate_beyond_the_edge(grid(8.63, 7.88, 7.45, 7.61, rates=(1e-3, 2e-3, 4e-3, 8e-3))) is None
  assert ablation.rate_beyond_the_edge(grid(7.2, 7.9, 8.4)) == 5e-4
  assert ablation.rate_beyond_the_edge(grid(8.0, 7.5, 7.9)) is None
  assert ablation.rate_beyond_the_edge(grid(8.0, 7.5, 7.0, failed=(4e-3,))) is None  # The best healthy is inside.
  assert ablation.rate_beyond_the_edge(grid(8.0, 7.5, 7.0, failed=(1e-3, 2e-3, 4e-3))) is None  # Nothing to go on.
  assert ablation.rate_beyond_the_edge(grid(8.0, rates=(3e-3,))) is None  # One rate: fixed, not searched.


def test_run_configs_replace_rather_than_merge_and_lengthen_scales_every_duration():
  base = ablation.base_config(
    "adamw_grid", dataset="fashion_mnist", model="nin_mnist", dtype="float32", validation_examples=10_000
  )
  assert dict(base.layer_lr_mults) == {"cccp6": 0.1} and base.dropout < 0 and base.weight_decay == 0.05
  config = ablation.run_config(base, head="fc", seed=3, train_examples=50_000, learning_rate=2e-3, epochs=10)
  assert (config.head, config.seed, config.learning_rate, config.num_epochs) == ("fc", 3, 2e-3, 10.0)
  assert config.checkpoint_every_steps == 781  # One epoch of 64: a resume repeats at most one.
  old = ablation.run_config(base, head="gap", seed=0, train_examples=50_000, steps=600, **ablation.OLD_RECIPE)
  assert dict(old.layer_lr_mults) == {} and old.num_train_steps == 600 and old.warmup_steps == 50
  paper = ablation.base_config(
    "paper_cifar10", dataset="cifar10", model="nin_cifar10", dtype="float32", validation_examples=0
  )
  long = ablation.lengthen(ablation.run_config(paper, head="gap", seed=0, train_examples=0), 2)
  assert (long.num_train_steps, long.decay_steps) == (240_000, (200_000,))
  assert ablation.lengthen(config, 2).num_epochs == 20.0
  with pytest.raises(ValueError, match="choose one of: adamw_grid, paper_cifar10"):
    ablation.base_config("sgd", dataset="cifar10", model="nin_cifar10", dtype="float32", validation_examples=0)


def test_a_record_stands_only_for_the_config_it_trained(tmp_path):
  base = ablation.base_config(
    "adamw_grid", dataset="fashion_mnist", model="nin_mnist", dtype="float32", validation_examples=10_000
  )
  config = ablation.run_config(base, head="gap", seed=0, train_examples=50_000, learning_rate=2e-3, epochs=10)
  grid = {**record("grid-0.002", "gap", 0, 9.0), "config": json.loads(json.dumps(config.to_dict()))}
  adopted = ablation.adopt(grid, ablation.Spec("full", "gap", 0, config), tmp_path)
  assert adopted["name"] == "full-gap-0" and adopted["adopted_from"] == "grid-0.002-gap-0"
  assert json.loads((tmp_path / "runs" / "full-gap-0.json").read_text()) == adopted
  other = ablation.run_config(base, head="gap", seed=0, train_examples=50_000, learning_rate=4e-3, epochs=10)
  with pytest.raises(ValueError, match="cannot stand for it"):
    ablation.adopt(grid, ablation.Spec("full", "gap", 0, other), tmp_path)


def test_a_moved_record_leaves_its_old_name_free_and_keeps_its_workdir(tmp_path):
  """When a setting doubles in length its old long run becomes seed 0 of the new length, and
  the long name must be free for the new long run; an adopted record's workdir stays the one
  it trained in."""
  base = ablation.base_config(
    "adamw_grid", dataset="fashion_mnist", model="nin_mnist", dtype="float32", validation_examples=10_000
  )
  ten = ablation.run_config(base, head="gap", seed=0, train_examples=50_000, learning_rate=2e-3, epochs=10)
  twenty = ablation.run_config(base, head="gap", seed=0, train_examples=50_000, learning_rate=2e-3, epochs=20)
  assert json.loads(json.dumps(ablation.lengthen(ten, 2).to_dict())) == json.loads(json.dumps(twenty.to_dict()))
  runs = tmp_path / "runs"
  long = {**record("long-full", "gap", 0, 7.0), "config": json.loads(json.dumps(twenty.to_dict()))}
  runs.mkdir()
  (runs / "long-full-gap-0.json").write_text(json.dumps(long))
  moved = ablation.adopt(long, ablation.Spec("full", "gap", 0, twenty), tmp_path, move=True)
  assert sorted(p.name for p in runs.iterdir()) == ["full-gap-0.json"]
  assert moved["setting"] == "full" and ablation.workdir_of(moved, "/w") == Path("/w/long-full-gap-0")
  again = ablation.adopt(moved, ablation.Spec("full-e20", "gap", 0, twenty), tmp_path, move=True)
  assert sorted(p.name for p in runs.iterdir()) == ["full-e20-gap-0.json"]
  assert again["adopted_from"] == "long-full-gap-0"
  # Where its workdir is here, the workdir moves with it and the record names it no more.
  workdirs = epath.Path(tmp_path / "workdirs")
  (workdirs / "long-full-gap-0").mkdir(parents=True)
  workdir_lib.write_config(workdirs / "long-full-gap-0", ablation.lengthen(twenty, 2).to_dict())
  kept = ablation.adopt(
    again, ablation.Spec("full-x", "gap", 0, twenty), tmp_path, move=True, workdir_root=str(workdirs)
  )
  assert kept["adopted_from"] == "long-full-gap-0"  # That workdir ran the 40-epoch run: it stays.
  assert sorted(p.name for p in workdirs.iterdir()) == ["long-full-gap-0"]
  workdir_lib.write_config(workdirs / "long-full-gap-0", twenty.to_dict())
  here = ablation.adopt(kept, ablation.Spec("full", "gap", 0, twenty), tmp_path, move=True, workdir_root=str(workdirs))
  assert sorted(p.name for p in workdirs.iterdir()) == ["full-gap-0"] and "adopted_from" not in here
  assert ablation.workdir_of(here, str(workdirs)) == Path(workdirs / "full-gap-0")


def test_a_run_is_here_only_where_its_workdir_ran_its_config(tmp_path):
  """A moved record's workdir (long-full-gap-0, 20 epochs) taken over by the new long run
  (40 epochs) must not pass for it: the figure would draw another model under its name."""
  base = ablation.base_config(
    "adamw_grid", dataset="fashion_mnist", model="nin_mnist", dtype="float32", validation_examples=10_000
  )
  twenty = ablation.run_config(base, head="gap", seed=0, train_examples=50_000, learning_rate=2e-3, epochs=20)
  seed_0 = {
    **record("full", "gap", 0, 7.0),
    "adopted_from": "long-full-gap-0",
    "config": json.loads(json.dumps(twenty.to_dict())),
  }
  assert not ablation.trained_here(seed_0, str(tmp_path))  # Not on this machine.
  workdir = epath.Path(tmp_path / "long-full-gap-0")
  workdir.mkdir()
  workdir_lib.write_config(workdir, ablation.lengthen(twenty, 2).to_dict())
  assert not ablation.trained_here(seed_0, str(tmp_path))  # The 40-epoch run took the name.
  workdir_lib.write_config(workdir, twenty.to_dict())
  assert ablation.trained_here(seed_0, str(tmp_path))


@pytest.mark.slow
def test_the_heads_of_a_seed_share_the_body_and_differ_only_in_the_head():
  built = {head: ablation.initial_model(small_config(head=head, seed=5)) for head in models.HEADS}
  bodies = {head: nnx.to_pure_dict(nnx.state(m.blocks)) for head, m in built.items()}
  leaves = {head: [x.tolist() for x in jax.tree.leaves(b)] for head, b in bodies.items()}
  assert leaves["gap"] == leaves["fc"] == leaves["fc_dropout"]
  assert built["gap"].classifier is None and built["fc"].classifier is not None
  other_seed = nnx.state(ablation.initial_model(small_config(head="gap", seed=6)).blocks)
  assert [x.tolist() for x in jax.tree.leaves(nnx.to_pure_dict(other_seed))] != leaves["gap"]


@pytest.mark.slow
@pytest.mark.skipif(not datasets.os.path.isdir(datasets.DEBIAN_FASHION_MNIST), reason="needs dataset-fashion-mnist")
def test_an_ablation_run_writes_its_record_once_and_is_read_back(tmp_path):
  """A tiny run end to end: validation error per epoch from the held-out split, test and train
  errors in eval mode, the dead-class diagnosis, and no second training once the record exists."""
  config = small_config(
    head="gap",
    train_examples=256,
    eval_examples=0,
    validation_examples=1000,
    num_train_steps=-1,
    num_epochs=2.0,
    eval_every_steps=0,
    checkpoint_every_steps=8,
  )
  spec = ablation.Spec("small", "gap", 0, config)
  said = []
  result = ablation.run(spec, str(tmp_path / "work"), tmp_path / "results", say=said.append)
  assert ablation.record_path(tmp_path / "results", spec).name == "small-gap-0.json"
  assert list(result["validation_error_by_step"]) == ["8", "16"]  # 256 / 32 = 8 steps per epoch.
  assert all(0 <= e <= 100 for e in result["validation_error_by_step"].values())
  assert result["train_examples"] == 256 and 0 <= result["test_error"] <= 100
  # The test error is on the whole test set, not the 1,000 validation images the run evaluated on.
  assert result["test_examples"] == 10_000
  assert result["failed"] == bool(result["dead_classes"]["never_predicted"] or result["dead_classes"]["zero_maps"])
  assert len(said) == 1 and said[0].startswith("small-gap-0")
  again = ablation.run(spec, "/nonexistent", tmp_path / "results", say=said.append)  # Read, not trained.
  assert again == json.loads(json.dumps(result)) and len(said) == 1
  assembled = json.loads(ablation.assemble(tmp_path / "results").read_text())
  assert [r["name"] for r in assembled] == ["small-gap-0"]


def _sigterm_once_the_trainer_listens() -> None:
  """A session's end: SIGTERM to this process as soon as the training loop's handler is in
  place (so the stop is neither lost nor fatal, however fast the machine)."""
  while getattr(signal.getsignal(signal.SIGTERM), "__func__", None) is not preemption.StopRequest._handle:
    time.sleep(0.01)
  os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.skipif(not datasets.os.path.isdir(datasets.DEBIAN_FASHION_MNIST), reason="needs dataset-fashion-mnist")
def test_a_run_stopped_and_resumed_records_the_wall_time_of_both_segments(tmp_path, monkeypatch):
  config = small_config(head="gap", train_examples=256, eval_examples=0, validation_examples=1000, num_train_steps=16)
  spec = ablation.Spec("small", "gap", 0, config)

  def train_on():
    return ablation.run(spec, str(tmp_path / "work"), tmp_path / "results", train_error=False, test_examples=100)

  threading.Thread(target=_sigterm_once_the_trainer_listens, daemon=True).start()
  with pytest.raises(errors.Interrupted):
    train_on()
  first = json.loads((tmp_path / "work" / spec.name / ablation.SECONDS_FILE).read_text())["seconds"]
  assert first > 0.5 and not ablation.record_path(tmp_path / "results", spec).exists()
  measuring = []  # The final measurement's time, which wall_seconds leaves out: the real one, timed.
  real_measure = ablation.measure

  def timed_measure(*args, **kwargs):
    started = time.perf_counter()
    try:
      return real_measure(*args, **kwargs)
    finally:
      measuring.append(time.perf_counter() - started)

  monkeypatch.setattr(ablation, "measure", timed_measure)
  started = time.perf_counter()
  result = train_on()
  training = time.perf_counter() - started - measuring[0]
  # The record adds this segment's training to the first's (each rounded to 0.1 s); without
  # the earlier segment it would be `training` alone, `first` (> 0.5 s, asserted above) short.
  assert first + training - 0.3 < result["wall_seconds"] <= first + training + 0.1


def test_a_run_held_by_another_process_is_left_to_it(tmp_path):
  """Several notebook processes share one ablation: a run whose workdir another live process
  holds is skipped here: no record, no training, a line that says why."""
  spec = ablation.Spec("small", "gap", 0, small_config(head="gap", num_train_steps=2, eval_every_steps=0))
  workdir = tmp_path / "work" / spec.name
  workdir.mkdir(parents=True)
  said = []
  with lock.WorkdirLock(workdir_lib.resolve(workdir)):  # This live process stands for the other one.
    assert ablation.run(spec, str(tmp_path / "work"), tmp_path / "results", say=said.append) is None
  assert said == ["small-gap-0                skipped: another process is training it"]
  assert not ablation.record_path(tmp_path / "results", spec).exists()
  assert not (workdir / "checkpoints").exists() and not (workdir / ablation.SECONDS_FILE).exists()


@pytest.mark.slow
def test_a_trace_trains_the_run_again_bit_for_bit_and_reads_every_checkpoint(tmp_path):
  """The traced run is the recorded one (its last validation error is equal, though it saves
  and logs every 4 steps), and the maps are read at the initialisation and every checkpoint."""
  config = small_config(
    head="gap", train_examples=256, validation_examples=500, num_train_steps=-1, num_epochs=1.0, eval_every_steps=0
  )
  spec = ablation.Spec("failure-old", "gap", 0, config)
  results = tmp_path / "results"
  recorded = ablation.run(spec, str(tmp_path / "work"), results, train_error=False, test_examples=100, say=print)
  said = []
  traced = ablation.trace(recorded, str(tmp_path / "work"), results, every=4, test_examples=100, say=said.append)
  assert traced["reproduced"] is True and traced["steps"] == [0, 4, 8] and traced["test_examples"] == 100
  assert [len(a) for a in traced["alive_share"]] == [10, 10, 10]
  assert all(0 <= share <= 100 for a in traced["alive_share"] for share in a)
  assert traced["learning_rate"][0] == 0.0 and traced["learning_rate"][1] > 0
  assert said == ["traced failure-old-gap-0: reproduced True, 3 checkpoints"]
  again = ablation.trace(recorded, "/nonexistent", results, every=4, say=said.append)  # Read, not trained.
  assert again == json.loads(json.dumps(traced)) and len(said) == 1
  # A trace is no run record: the tables never average it.
  assert ablation.records(results) == [json.loads(json.dumps(recorded))]
  with pytest.raises(errors.DataError, match=r"No checkpoint at step 5 in .*; it has \[4, 8\]"):
    analysis.load_model(tmp_path / "work" / "trace-failure-old-gap-0", config, step=5)


@pytest.mark.slow
def test_table5_recipe_trains_every_head_alike_on_cifar10_mock_data(tmp_path):
  """`-p dataset cifar10 -p model nin_cifar10 -p recipe paper_cifar10`: the fixed SGD recipe of
  experiments/nin_cifar10.py without augmentation, end to end on TFDS mock data."""
  base = ablation.base_config(
    "paper_cifar10", dataset="cifar10", model="nin_cifar10", dtype="float32", validation_examples=8
  )
  configs_ = {
    head: ablation.run_config(
      base, head=head, seed=0, train_examples=0, steps=2, batch_size=8, eval_batch_size=8, download=False
    )
    for head in models.HEADS
  }
  alike = [{k: v for k, v in c.to_dict().items() if k != "head"} for c in configs_.values()]
  assert alike[0] == alike[1] == alike[2]  # No per-head tuning.
  assert base.preprocess == "gcn_zca"  # The paper's; fitting ZCA on 3,072 dimensions takes ~13 s, so not here.
  config = ablation.run_config(
    configs_["fc_dropout"], head="fc_dropout", seed=0, train_examples=0, preprocess="standardize"
  )
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    result = ablation.run(
      ablation.Spec("full", "fc_dropout", 0, config), str(tmp_path / "work"), tmp_path / "res", say=lambda line: None
    )
  c = result["config"]
  assert (c["optimizer"], c["learning_rate"], c["augment"], c["num_train_steps"]) == ("sgd", 0.1, "none", 2)
  assert c["layer_lr_mults"] == {"cccp6": 0.1} and list(c["decay_steps"]) == [100_000]
  assert result["train_examples"] == 16 and result["test_examples"] == 24  # 8 of the 24 held out.
  assert list(result["validation_error_by_step"]) == ["2"] and result["test_error"] is not None
