"""The head ablation (paper Table 5) as resumable runs, each ending in a committed record.

An ablation that takes longer than one working session has to finish over several: every
run is an ordinary workdir (it resumes where it stopped), and a finished run writes one
JSON record, `<results>/runs/<name>.json`, holding everything the tables need;
`notebooks/head_ablation.ipynb` trains only the runs whose record is missing and builds its
tables from the records alone (`assemble` writes them into `head_ablation.json`).

What a record holds, and how it is measured:
- the validation error after every epoch (the run evaluates on `validation_examples` held
  out of the training set, never on the test set while training);
- the test error, evaluated once at the end, and the error on the whole training split,
  both in evaluation mode (no dropout), so test - train is a real generalisation gap;
- the wall time of the whole run's training (per-epoch validation included, the final
  measurement not), over every segment when it was stopped and resumed;
- the diagnosis of the GAP head's known failure (`analysis.dead_classes` on the test set):
  classes never predicted and class maps zero on every test image. A run with either, or
  one that diverged, is `failed`: listed with its diagnosis and kept out of the means.

The runs of one seed share the body's initialisation and the data order whatever the head
(`NIN` builds the body before the head from the same seed; batches are a function of the
seed and step), so the heads' errors are paired by seed.
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
from etils import epath

from nin_jax import ablation_report, analysis, configs, errors, lineage, train
from nin_jax.data import input_pipeline
from nin_jax.model import dtype_probe, models
from nin_jax.run import checkpointing, lock
from nin_jax.run import workdir as workdir_lib

# The recipes the ablation can train with. `adamw_grid` is this project's: per-head learning
# rates from a grid on the validation split. `paper_cifar10` is Table 5's: the fixed SGD
# schedule of experiments/nin_cifar10.py without augmentation, the same for every head.
RECIPES = ("adamw_grid", "paper_cifar10")

# In a run's workdir: the wall seconds its stopped segments spent, added to its record's.
SECONDS_FILE = "ablation_seconds.json"

# The recipe the ablation committed before issue 19 (0.64 epochs; half its GAP runs lost a
# class): kept to measure the failure rate that the new recipe is compared with.
OLD_RECIPE = dict(
  optimizer="adamw",
  learning_rate=3e-3,
  weight_decay=5e-4,
  bias_lr_mult=1.0,
  schedule="cosine",
  warmup_steps=50,
  dropout=0.0,
  layer_lr_mults={},
  batch_size=64,
)


@dataclasses.dataclass(frozen=True)
class Spec:
  """One run: which head, setting and seed, and the config it trains with."""

  setting: str  # e.g. "full", "small", "grid-3e-03", "long-full", "failure-old"
  head: str
  seed: int
  config: ml_collections.ConfigDict

  @property
  def name(self) -> str:
    return f"{self.setting}-{self.head}-{self.seed}"


def per_class_layer(model: str) -> str:
  """The Caffe name of the layer that emits one map per class (cccp6 in the small models)."""
  return models.layer_names(models.get_spec(model))[-1][-1]


def base_config(
  recipe: str, *, dataset: str, model: str, dtype: str, validation_examples: int, batch_size: int = 64
) -> ml_collections.ConfigDict:
  """Everything but the head, seed, learning rate, length and training-set size.

  `adamw_grid`: AdamW with a real decoupled weight decay (0.05, i.e. 0.05 x lr per step),
  biases at the same rate; the paper's dropout 0.5 after the pooled blocks; the per-class
  layer at 0.1x the learning rate (as the Caffe models), for every head; one epoch of
  warm-up, then a cosine decay to zero; no augmentation and no label smoothing (Table 5).
  """
  if recipe not in RECIPES:
    raise ValueError(f"Unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}.")
  config = configs.default_config()
  if recipe == "paper_cifar10":
    from experiments import nin_cifar10  # pylint: disable=g-import-not-at-top

    config = nin_cifar10.get_config("noaug")
  else:
    config.update(
      dict(
        optimizer="adamw",
        weight_decay=0.05,
        bias_lr_mult=1.0,
        schedule="cosine",
        warmup_epochs=1.0,
        dropout=-1.0,
        label_smoothing=0.0,
        augment="none",
        batch_size=batch_size,
      )
    )
    config.layer_lr_mults = {per_class_layer(model): 0.1}
  preprocess = {"cifar10": "gcn_zca", "cifar100": "gcn_zca", "svhn": "lcn"}.get(dataset, "standardize")
  config.update(
    dict(
      dataset=dataset,
      model=model,
      dtype=dtype,
      preprocess=preprocess,
      validation_examples=validation_examples,
      eval_every_steps=0,
      eval_batch_size=500,
      keep_checkpoints=1,
    )
  )
  return config


def run_config(
  base: ml_collections.ConfigDict,
  *,
  head: str,
  seed: int,
  train_examples: int,
  learning_rate: float | None = None,
  epochs: float | None = None,
  steps: int | None = None,
  **overrides,
) -> ml_collections.ConfigDict:
  """`base` with one run's head, seed and data; a length in epochs or steps (else the
  recipe's), a learning rate (else the recipe's) and any other overrides."""
  config = ml_collections.ConfigDict(base.to_dict())
  for key, value in dict(head=head, seed=seed, train_examples=train_examples, **overrides).items():
    config[key] = value  # Replaces, never merges (a layer_lr_mults of {} means none).
  if learning_rate is not None:
    config.learning_rate = learning_rate
  if steps is not None:
    config.num_train_steps = steps
  elif epochs is not None:
    config.num_epochs, config.num_train_steps = float(epochs), -1
  per_epoch = max(train_examples // config.batch_size, 1) if train_examples else 0
  config.log_every_steps = max(min(per_epoch or 100, 100), 1)
  config.checkpoint_every_steps = per_epoch or 1000  # Resume costs at most one epoch.
  return config


def lengthen(config: ml_collections.ConfigDict, factor: float) -> ml_collections.ConfigDict:
  """The same run `factor` times as long: its length and any step-decay points scaled."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.num_train_steps > 0:
    config.num_train_steps = int(round(config.num_train_steps * factor))
  config.num_epochs *= factor
  config.decay_steps = tuple(int(round(s * factor)) for s in config.decay_steps)
  config.decay_epochs = tuple(e * factor for e in config.decay_epochs)
  return config


def adopt(record: dict, spec: Spec, results: Path, *, move: bool = False, workdir_root: str | None = None) -> dict:
  """Files an identical run's record under `spec` (the grid's run at the chosen learning
  rate is the seed's main run: training it again would give the same numbers).

  `move` renames instead: the record leaves its old name, and so does its workdir when it
  is below `workdir_root` (`trained_here`: a workdir of that name that ran another config,
  such as a later run's of a freed name, stays where it is). When a setting's length
  changes, its twice-as-long run becomes seed 0 of the new length and its runs of the old
  length are filed apart; their names must be free, on disk too, for the runs of the new
  length (a workdir refuses a rerun with another length)."""
  if record["config"] != json.loads(json.dumps(spec.config.to_dict())):
    raise ValueError(f"{record['name']} did not train {spec.name}'s config; it cannot stand for it.")
  trained_as = record.get("adopted_from", record["name"])  # Its workdir's name.
  if move and workdir_root is not None and trained_here(record, workdir_root):  # Not another run's of that name.
    (Path(workdir_root) / trained_as).rename(Path(workdir_root) / spec.name)  # Fails onto a non-empty one.
    trained_as = spec.name
  adopted = {k: v for k, v in record.items() if k != "adopted_from"}
  adopted.update(
    name=spec.name, setting=spec.setting, **({"adopted_from": trained_as} if trained_as != spec.name else {})
  )
  _write(record_path(results, spec), adopted)
  old = Path(results) / "runs" / f"{record['name']}.json"
  if move and old != record_path(results, spec):
    old.unlink(missing_ok=True)
  return adopted


def workdir_of(record: dict, workdir_root: str) -> Path:
  """Where the run of a record trained (an adopted record's run is the one it was filed from)."""
  return Path(workdir_root) / record.get("adopted_from", record["name"])


def trained_here(record: dict, workdir_root: str) -> bool:
  """Whether the record's run is in its workdir below `workdir_root`: the workdir exists and
  ran the record's config. A workdir may hold another run under the record's name: a record
  moved on another machine leaves its workdir behind there, and a run trained here since may
  have taken the name (a setting's new long run trains where its old long run, now seed 0
  of the new length, used to)."""
  workdir = epath.Path(workdir_of(record, workdir_root))
  return workdir.is_dir() and lineage.effective_config(workdir) == record["config"]


def train_again(record: dict, workdir_root: str) -> Path:
  """Trains a recorded run again in its workdir, from its own config, to draw a run whose
  workdir stayed on another machine. On the same kernels it is the same run bit for bit;
  another CPU's bfloat16 kernels may round differently, so compare what is drawn with the
  record (a dead class may not die again)."""
  workdir = workdir_of(record, workdir_root)
  with contextlib.redirect_stdout(io.StringIO()):
    train.train_and_evaluate(ml_collections.ConfigDict(record["config"]), str(workdir))
  return workdir


def _write(path: Path, record: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_suffix(".partial")
  partial.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
  partial.replace(path)  # A record exists only once it is whole.


def record_path(results: Path, spec: Spec) -> Path:
  return Path(results) / "runs" / f"{spec.name}.json"


def _identity(spec: Spec) -> dict:
  c = spec.config
  return {
    "name": spec.name,
    "setting": spec.setting,
    "head": spec.head,
    "seed": spec.seed,
    "learning_rate": c.learning_rate,
    "epochs": c.num_epochs,
    "steps": c.num_train_steps,
    "config": c.to_dict(),
    "cpu": dtype_probe.cpu_name(),
  }


def measure(spec: Spec, workdir: str, wall_seconds: float, *, train_error: bool = True, test_examples: int = 0) -> dict:
  """The record of a finished run in `workdir` (see the module docstring); the test error on
  the first `test_examples` test images (0: all of them)."""
  run = analysis.read_run(workdir, spec.name)
  by_step = {int(r["step"]): 100 * (1 - r["eval_accuracy"]) for r in run.evals}
  model, _ = analysis.load_model(workdir, spec.config)
  # One load: the run's own training split and the test set (not its validation split),
  # preprocessed with the statistics of the images it trained on.
  whole_test = ml_collections.ConfigDict({**spec.config.to_dict(), "eval_examples": test_examples})
  train_images, train_labels, test_images, test_labels = input_pipeline.in_memory_arrays(whole_test, test_set=True)
  maps, logits = analysis.class_maps(model, test_images)
  dead = analysis.dead_classes(maps if spec.config.head == "gap" else None, logits)
  return {
    **_identity(spec),
    "train_examples": len(train_labels),
    "diverged": False,
    "validation_error_by_step": {str(s): e for s, e in sorted(by_step.items())},
    "test_error": 100 * float(np.mean(logits.argmax(-1) != test_labels)),
    "test_examples": len(test_labels),
    "train_error": analysis.error_rate(model, train_images, train_labels) if train_error else None,
    "true_class_strongest_map": 100 * float(np.mean(maps.mean(axis=(1, 2)).argmax(-1) == test_labels)),
    "dead_classes": dead,
    "failed": bool(dead["never_predicted"] or dead["zero_maps"]),
    "wall_seconds": round(wall_seconds, 1),
  }


def diverged_record(spec: Spec, error: errors.TrainingDiverged, wall_seconds: float) -> dict:
  """A run whose loss became NaN: failed, with the trainer's one-line reason as diagnosis."""
  return {
    **_identity(spec),
    "diverged": True,
    "failed": True,
    "diagnosis": str(error).splitlines()[0],
    "validation_error_by_step": {},
    "test_error": None,
    "train_error": None,
    "true_class_strongest_map": None,
    "dead_classes": {"never_predicted": [], "zero_maps": []},
    "wall_seconds": round(wall_seconds, 1),
  }


def describe(record: dict) -> str:
  """One line per finished run, as the notebook prints it."""
  if record["diverged"]:
    return f"{record['name']:<26} FAILED: {record['diagnosis']}  ({record['wall_seconds']:.0f} s)"
  train_error = record["train_error"]
  return (
    f"{record['name']:<26} validation {ablation_report.last_validation_error(record):5.2f}%  "
    f"test {record['test_error']:5.2f}%"
    + (f"  train {train_error:5.2f}%" if train_error is not None else "")
    + (f"  FAILED: {json.dumps(record['dead_classes'])}" if record["failed"] else "")
    + f"  ({record['wall_seconds']:.0f} s)"
  )


def run(
  spec: Spec, workdir_root: str, results: Path, *, train_error: bool = True, test_examples: int = 0, say=print
) -> dict | None:
  """Trains `spec` (resuming its workdir) unless its record exists; returns the record, or
  None when another process holds the run's workdir (it trains and records the run).

  So several processes can share one ablation, each taking the runs no other holds: two
  processes pinned to one core each train more in all than one on both (docs/notebooks.md).
  """
  path = record_path(results, spec)
  if path.exists():
    return json.loads(path.read_text())
  workdir = str(Path(workdir_root) / spec.name)
  earlier, started = _earlier_seconds(workdir), time.perf_counter()

  def wall_seconds() -> float:
    return earlier + time.perf_counter() - started

  try:
    record = _train_then_write(
      spec.config,
      workdir,
      path,
      lambda: measure(spec, workdir, wall_seconds(), train_error=train_error, test_examples=test_examples),
      say,
    )
  except errors.TrainingDiverged as e:
    record = diverged_record(spec, e, wall_seconds())
    _write(path, record)
  except BaseException:  # Stopped (SIGTERM at a session's end, Ctrl-C) or crashed: it resumes.
    _save_earlier_seconds(workdir, wall_seconds())
    raise
  if record is not None:
    say(describe(record))
  return record


def _earlier_seconds(workdir: str) -> float:
  """The wall time of a run's earlier segments, so that the record of a run stopped and
  resumed (a session ended, a host was preempted) gives the whole run's time, not its last
  segment's."""
  path = workdir_lib.resolve(workdir) / SECONDS_FILE
  return float(json.loads(path.read_text())["seconds"]) if path.exists() else 0.0


def _save_earlier_seconds(workdir: str, seconds: float) -> None:
  path = workdir_lib.resolve(workdir)
  if path.is_dir():  # A run stopped before it made its workdir spent nothing worth adding.
    workdir_lib.write_text(path / SECONDS_FILE, json.dumps({"seconds": round(seconds, 1)}) + "\n")


def _train_then_write(config: ml_collections.ConfigDict, workdir: str, path: Path, measure_it, say) -> dict | None:
  """Trains `config` in `workdir` (resuming it), then writes `measure_it()` to `path` while
  holding the workdir's lock, so that of several processes one trains and one measures;
  None, said in one line, when another process holds the workdir."""
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      train.train_and_evaluate(config, workdir)
    with lock.WorkdirLock(workdir_lib.resolve(workdir), say=say):
      if path.exists():  # Another process finished it between our check and our lock.
        return json.loads(path.read_text())
      record = measure_it()
      _write(path, record)
      return record
  except (lock.WorkdirInUse, errors.WorkdirLost):
    say(f"{Path(workdir).name:<26} skipped: another process is training it")
    return None


def trace_path(results: Path, record: dict) -> Path:
  return Path(results) / "traces" / f"{record['name']}.json"


def trace(record: dict, workdir_root: str, results: Path, *, every: int = 10, test_examples: int = 1000, say=print):
  """When the class maps of a run died: the run trained again from scratch with its own
  config (the same run, bit for bit, on the same kernels: `reproduced` checks it) and a
  checkpoint every `every` steps; then, at the initialisation and at every checkpoint, the
  share of the first `test_examples` test images on which each class map is positive
  somewhere (`analysis.alive_share`).

  Written to `<results>/traces/<name>.json` (kept apart from the run records, which the
  tables average); returns it, or None while another process holds the trace's workdir.
  """
  path = trace_path(results, record)
  if path.exists():
    return json.loads(path.read_text())
  config = ml_collections.ConfigDict(record["config"])
  config.checkpoint_every_steps = config.log_every_steps = every  # The rate is logged at every checkpoint.
  config.keep_checkpoints = 1_000_000  # Every one.
  workdir = str(Path(workdir_root) / f"trace-{record['name']}")
  result = _train_then_write(config, workdir, path, lambda: _alive_by_step(record, config, workdir, test_examples), say)
  if result is not None:
    say(f"traced {record['name']}: reproduced {result['reproduced']}, {len(result['steps'])} checkpoints")
  return result


def _alive_by_step(record: dict, config: ml_collections.ConfigDict, workdir: str, test_examples: int) -> dict:
  images, _ = analysis.dataset_images(config, "test", test_examples)
  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
  steps = sorted(manager.all_steps())
  manager.close()

  def model_at(step):  # Step 0: the initialisation.
    return initial_model(config) if step == 0 else analysis.load_model(workdir, config, step=step)[0]

  steps = [0, *steps]
  alive = [analysis.alive_share(analysis.class_maps(model_at(s), images)[0]).round(2).tolist() for s in steps]
  run = analysis.read_run(workdir)
  rate = {int(r["step"]): r["learning_rate"] for r in run.train}
  return {
    "name": record["name"],
    "every": config.checkpoint_every_steps,
    "test_examples": len(images),
    "steps": steps,
    "learning_rate": [rate.get(s, 0.0) for s in steps],
    "alive_share": alive,  # [step][class], %.
    # The same config gave the same run: its last validation error equals the record's.
    "reproduced": run.test_error == ablation_report.last_validation_error(record),
    "config": config.to_dict(),
    "cpu": dtype_probe.cpu_name(),
  }


def initial_model(config: ml_collections.ConfigDict) -> models.NIN:
  """The model as the trainer initialises it for `config` (from its seed)."""
  return configs.model_config(config).initial()


def alive_at_init(
  config: ml_collections.ConfigDict, seeds: list[int], results: Path, *, test_examples: int = 1000
) -> dict[str, list[float]]:
  """Per seed, the share (%) of the first `test_examples` test images each class map is
  alive on at initialisation, before any update: no training, so many seeds cost seconds.
  Written to `<results>/traces/init.json` (read back while the seeds are the same)."""
  path = Path(results) / "traces" / "init.json"
  saved = json.loads(path.read_text()) if path.exists() else {}
  if list(saved) == [str(s) for s in seeds]:
    return saved
  images, _ = analysis.dataset_images(config, "test", test_examples)
  alive = {}
  for seed in seeds:
    seeded = ml_collections.ConfigDict({**config.to_dict(), "seed": seed})
    alive[str(seed)] = analysis.alive_share(analysis.class_maps(initial_model(seeded), images)[0]).round(2).tolist()
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(alive, indent=1) + "\n")
  return alive


def records(results: Path) -> list[dict]:
  return [json.loads(p.read_text()) for p in sorted((Path(results) / "runs").glob("*.json"))]


def assemble(results: Path) -> Path:
  """Writes every record into `<results>/head_ablation.json` (one list, sorted by name)."""
  out = Path(results) / "head_ablation.json"
  out.write_text(json.dumps(records(results), indent=1, sort_keys=True) + "\n")
  return out


def final_validation_error(record: dict) -> float:
  """The validation error after the last epoch (inf for a failed run: never chosen)."""
  if record["failed"] or not record["validation_error_by_step"]:
    return float("inf")
  return ablation_report.last_validation_error(record)


def choose_learning_rate(grid: list[dict], say=print) -> float:
  """The grid's learning rate with the lowest final validation error (one head's runs); a
  failed run is never chosen while a healthy one exists."""
  best = min(grid, key=final_validation_error)
  if final_validation_error(best) == float("inf"):
    healthy = [r for r in grid if r["validation_error_by_step"]]
    if not healthy:
      raise ValueError(f"every grid run of head {best['head']!r} diverged; lower the learning-rate grid.")
    best = min(healthy, key=ablation_report.last_validation_error)
    say(
      f"warning: every grid run of head {best['head']!r} failed; chose lr {best['learning_rate']:g} by "
      "validation error alone: widen the grid or train longer."
    )
  return best["learning_rate"]


def rate_beyond_the_edge(grid: list[dict]) -> float | None:
  """The next rate to try when one head's best healthy grid run lies at the grid's edge: twice
  the largest rate or half the smallest. A rate chosen at an edge is not a tuned one (the best
  may lie beyond it); None once a tried rate flanks the best on each side, for a one-rate grid
  (a fixed rate, not a search) and when every run failed (choose_learning_rate warns then)."""
  rates = sorted(r["learning_rate"] for r in grid)
  if len(rates) < 2 or all(final_validation_error(r) == float("inf") for r in grid):
    return None
  best = choose_learning_rate(grid)  # The one rule that picks the best, healthy since one is.
  if best == rates[-1]:
    return 2 * best
  if best == rates[0]:
    return best / 2
  return None
