"""The head ablation (paper Table 5) as resumable runs, each ending in a committed record.

An ablation that takes longer than one working session has to finish over several: every
run is an ordinary workdir (it resumes where it stopped), and a finished run writes one
JSON record, `<results>/runs/<setting>-<head>-<seed>.json`, holding everything the tables
need; `notebooks/head_ablation.py` trains only the runs whose record is missing and builds
its tables from the records alone (`assemble` writes them into `head_ablation.json`).

What a record holds, and how it is measured:
- the validation error after every epoch (the run evaluates on `validation_examples` held
  out of the training set, never on the test set while training);
- the test error, evaluated once at the end, and the error on the whole training split,
  both in evaluation mode (no dropout), so test - train is a real generalisation gap;
- the diagnosis of the GAP head's known failure (`analysis.dead_classes` on the test set):
  classes never predicted and class maps zero on every test image. A run with either is
  `failed`: listed with its diagnosis and kept out of the means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
from pathlib import Path

import ml_collections
import numpy as np

from nin_jax import analysis, checkpointing, input_pipeline, train


@dataclasses.dataclass(frozen=True)
class Spec:
  """One run: which head, setting and seed, and the config it trains with."""
  setting: str  # e.g. "full", "small", "grid-gap-3e-03"
  head: str
  seed: int
  config: ml_collections.ConfigDict

  @property
  def name(self) -> str:
    return f"{self.setting}-{self.head}-{self.seed}"


def record_path(results: Path, spec: Spec) -> Path:
  return Path(results) / "runs" / f"{spec.name}.json"


def measure(spec: Spec, workdir: str, wall_seconds: float) -> dict:
  """The record of a finished run in `workdir` (see the module docstring)."""
  run = analysis.read_run(workdir, spec.name)
  epoch_steps = {int(r["step"]): 100 * (1 - r["eval_accuracy"]) for r in run.evals}
  model, _ = checkpointing.load_model(workdir, spec.config)
  # One load: the run's own training split and the test set (not its validation split),
  # preprocessed with the statistics of the images it trained on.
  whole_test = ml_collections.ConfigDict({**spec.config.to_dict(), "eval_examples": 0})
  train_images, train_labels, test_images, test_labels = input_pipeline.in_memory_arrays(whole_test,
                                                                                           test_set=True)
  maps, logits = analysis.class_maps(model, test_images)
  has_maps = spec.config.head == "gap"
  dead = analysis.dead_classes(maps if has_maps else None, logits)
  c = spec.config
  return {
      "name": spec.name, "setting": spec.setting, "head": spec.head, "seed": spec.seed,
      "learning_rate": c.learning_rate, "epochs": c.num_epochs, "train_examples": len(train_labels),
      "validation_error_by_step": {str(s): e for s, e in sorted(epoch_steps.items())},
      "test_error": 100 * float(np.mean(logits.argmax(-1) != test_labels)), "test_examples": len(test_labels),
      "train_error": analysis.error_rate(model, train_images, train_labels),
      "true_class_strongest_map": (100 * float(np.mean(maps.mean(axis=(1, 2)).argmax(-1) == test_labels))),
      "dead_classes": dead, "failed": bool(dead["never_predicted"] or dead["zero_maps"]),
      "wall_seconds": wall_seconds, "config": c.to_dict(),
  }


def run(spec: Spec, workdir_root: str, results: Path, say=print) -> dict:
  """Trains `spec` (resuming its workdir) unless its record exists; returns the record."""
  path = record_path(results, spec)
  if path.exists():
    return json.loads(path.read_text())
  workdir = str(Path(workdir_root) / spec.name)
  started = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):
    train.train_and_evaluate(spec.config, workdir)
  record = measure(spec, workdir, time.perf_counter() - started)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_suffix(".partial")
  partial.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
  partial.replace(path)  # A record exists only once it is whole.
  say(f"{spec.name:<28} validation {list(record['validation_error_by_step'].values())[-1]:5.2f}%  "
      f"test {record['test_error']:5.2f}%  train {record['train_error']:5.2f}%"
      + ("  FAILED: " + json.dumps(record["dead_classes"]) if record["failed"] else "")
      + f"  ({record['wall_seconds']:.0f} s)")
  return record


def records(results: Path) -> list[dict]:
  return [json.loads(p.read_text()) for p in sorted((Path(results) / "runs").glob("*.json"))]


def assemble(results: Path) -> Path:
  """Writes every record into `<results>/head_ablation.json` (one list, sorted by name)."""
  out = Path(results) / "head_ablation.json"
  out.write_text(json.dumps(records(results), indent=1, sort_keys=True) + "\n")
  return out
