"""What the notebooks compute from a run: its metrics, the last block's class maps, error
rates, the statistics over seeds (t-intervals, paired tests), the dead-class diagnosis and
the plots. The head ablation's tables from its records are in `ablation_report.py`.

Everything the notebooks compute lives in modules, where it is tested. Runs are ordinary
workdirs: their `metrics.jsonl` and `config.json` are the only inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from nin_jax import configs, lineage
from nin_jax.data import datasets, input_pipeline
from nin_jax.model import models
from nin_jax.run import checkpointing


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished run, as its workdir records it."""

  name: str  # Free label, e.g. "full/gap/seed0".
  head: str
  seed: int
  records: tuple[dict, ...]

  @property
  def train(self) -> list[dict]:
    return [r for r in self.records if "train_loss" in r]

  @property
  def evals(self) -> list[dict]:
    return [r for r in self.records if "eval_accuracy" in r]

  @property
  def test_error(self) -> float:
    """Error (%) of the last evaluation."""
    return 100 * (1 - self.evals[-1]["eval_accuracy"])


def read_run(workdir, name: str = "") -> Run:
  """The run in `workdir` (local or a URL): head and seed from its config, every metric line."""
  path = epath.Path(workdir)
  config = lineage.effective_config(path)
  if config is None:
    raise FileNotFoundError(f"{workdir} holds no run (no config.json).")
  lines = (path / "metrics.jsonl").read_text().splitlines()
  return Run(
    name or str(workdir),
    config["head"],
    int(config["seed"]),
    one_line_per_step([json.loads(line) for line in lines if line.strip()]),
  )


def _kind(record: dict) -> str:
  return "train" if "train_loss" in record else "eval" if "eval_accuracy" in record else "other"


def one_line_per_step(records: list[dict]) -> tuple[dict, ...]:
  """Each step's last train line and last eval line, in step order.

  A run killed between a log step and its next checkpoint wrote lines for steps that its
  resumed segment trains, and logs, again: the later line is the one the finished run stands
  on, so it wins.
  """
  latest = {(r["step"], _kind(r)): r for r in records}
  return tuple(sorted(latest.values(), key=lambda r: r["step"]))


def load_model(
  workdir: str | epath.Path, config: ml_collections.ConfigDict, step: int | None = None
) -> tuple[models.NIN, int]:
  """The model of the checkpoint at `step` in `workdir` (default: the latest), and its step."""
  # Shapes only: initialising parameters that the checkpoint overwrites costs seconds.
  model = nnx.eval_shape(lambda: configs.model_config(config).build(nnx.Rngs(0)))
  step = checkpointing.restore_params(workdir, model, keep=config.keep_checkpoints, step=step)
  return model, step


def dataset_images(config: ml_collections.ConfigDict, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` images of the "train" or "test" split as the run saw them (the same
  preprocessing, with the statistics of its training images), unaugmented, and their labels."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval_examples = 0  # Any test image, not only those the run evaluated on.
  train_x, train_y, test_x, test_y = input_pipeline.in_memory_arrays(config)
  images, labels = (train_x, train_y) if split == "train" else (test_x, test_y)
  return images[:count], labels[:count]


def class_names(dataset: str, num_classes: int) -> list[str]:
  return list(datasets.CLASS_NAMES.get(dataset, [str(i) for i in range(num_classes)]))


def error_rate(model: models.NIN, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
  """Error (%) of `model` in eval mode (no dropout) on the given images."""
  _, logits = class_maps(model, images, batch_size)
  return 100 * float(np.mean(logits.argmax(-1) != labels))


def class_maps(model: models.NIN, images: np.ndarray, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
  """(maps, logits): the output of the last mlpconv layer after its ReLU, one map per class
  (N, H, W, classes), and the model's logits for the same images, in eval mode."""
  graphdef, state = nnx.split(model)  # One compilation per batch shape, not one per call.
  maps, logits = zip(
    *(
      _maps_and_logits(graphdef, state, jnp.asarray(images[start : start + batch_size]))
      for start in range(0, len(images), batch_size)
    )
  )
  return np.concatenate([np.asarray(m) for m in maps]), np.concatenate([np.asarray(z) for z in logits])


@functools.partial(jax.jit, static_argnums=0)
def _maps_and_logits(graphdef, state, x: jax.Array):
  model = nnx.merge(graphdef, state)
  last, captured = models.layer_names(model.spec)[-1][-1], {}

  def hook(name, y, module):
    if name == last:
      captured["maps"] = y.astype(jnp.float32)

  logits = model(x, hook=hook)
  return captured["maps"], logits


def mean_curve(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(steps, mean value) over the steps every curve (rows of step, value) has: aligned by
  step, never by position, so a run that logged more or fewer points shifts nothing."""
  common = sorted(set.intersection(*(set(c[:, 0].tolist()) for c in curves)))
  values = [dict(zip(c[:, 0].tolist(), c[:, 1].tolist())) for c in curves]
  return np.array(common), np.array([statistics.fmean(v[s] for v in values) for s in common])


# ----------------------------------------------------------------------------- statistics


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high): the mean and its Student-t confidence interval over `values` (seeds)."""
  return _t_band(values, confidence, 1 / len(values))


def prediction_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high): where one more value from the same distribution lands with
  probability `confidence`, mean ± t·s·√(1 + 1/n). A run's error against the range of n
  others is a poor test: with n = 5 a sixth draw from the same recipe lies outside the range
  1 time in 3."""
  return _t_band(values, confidence, 1 + 1 / len(values))


def _t_band(values: list[float], confidence: float, variance_factor: float) -> tuple[float, float, float]:
  """mean ± t(n-1)·s·√variance_factor (the mean's interval: 1/n; one more value's: 1 + 1/n)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  mean = statistics.fmean(values)
  if len(values) < 2:
    return mean, float("nan"), float("nan")
  t = stats.t.ppf(0.5 + confidence / 2, len(values) - 1)
  half = t * statistics.stdev(values) * math.sqrt(variance_factor)
  return mean, mean - half, mean + half


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95) -> dict:
  """a - b over paired seeds: the mean difference, its t-interval and the paired t-test's
  two-sided p-value (the runs of one seed share the body's initialisation and data order)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  if len(a) != len(b):
    raise ValueError(f"paired differences need one value per seed on each side, got {len(a)} and {len(b)}")
  mean, low, high = t_interval([x - y for x, y in zip(a, b)], confidence)
  p_value = float(stats.ttest_rel(a, b).pvalue) if len(a) > 1 else float("nan")
  return {"mean": mean, "low": low, "high": high, "p_value": p_value, "pairs": len(a)}


def failure_rate_p_value(failed_a: int, runs_a: int, failed_b: int, runs_b: int) -> float:
  """Two-sided p-value of Fisher's exact test that two recipes fail equally often (counts
  of failed runs out of runs: too few runs for a normal approximation)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  return float(stats.fisher_exact([[failed_a, runs_a - failed_a], [failed_b, runs_b - failed_b]]).pvalue)


def verdict(name_a: str, name_b: str, difference: dict) -> str:
  """What a paired error difference (a - b, in points) decides: a is better (lower error) or
  worse when its interval excludes 0, else the two are not distinguishable at this power."""
  said = (
    f"{difference['mean']:+.2f} points (95% CI {difference['low']:+.2f} to {difference['high']:+.2f}, "
    f"paired t-test p = {difference['p_value']:.3g}, {difference['pairs']} seeds)"
  )
  if difference["high"] < 0:
    return f"{name_a} is better than {name_b}: {said}"
  if difference["low"] > 0:
    return f"{name_a} is worse than {name_b}: {said}"
  return f"{name_a} and {name_b} are not distinguishable at this power: {said}"


def alive_share(maps: np.ndarray) -> np.ndarray:
  """Per class, the share (%) of images on which its map (after its ReLU) is positive
  somewhere; `maps` is (N, H, W, classes). A map at 0% is dead on these images."""
  return 100 * (maps.reshape(len(maps), -1, maps.shape[-1]).max(1) > 0).mean(0)


def dead_classes(maps: np.ndarray, logits: np.ndarray) -> dict[str, list[int]]:
  """The failure a GAP head can suffer: classes whose map (after its ReLU) is zero on every
  image, so their logit is 0 forever, and classes the model never predicts on these images.
  `maps` is (N, H, W, classes) or None (an FC head has no class maps); `logits` (N, classes)."""
  classes = logits.shape[-1]
  never_predicted = sorted(set(range(classes)) - set(np.argmax(logits, -1).tolist()))
  zero_maps = [] if maps is None else [int(c) for c in np.flatnonzero(alive_share(maps) == 0)]
  return {"never_predicted": never_predicted, "zero_maps": zero_maps}


# ----------------------------------------------------------------------------- plots


def plot_class_maps(
  images: np.ndarray,
  maps: np.ndarray,
  labels: np.ndarray,
  predictions: np.ndarray,
  class_names: list[str],
  title: str = "",
):
  """Each image beside its per-class maps on one colour scale; the true class's map framed
  in green, a wrong prediction's in red (the paper's Figure 4)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows, classes = len(images), maps.shape[-1]
  fig, axes = plt.subplots(rows, classes + 1, figsize=(1.25 * (classes + 1), 1.35 * rows), squeeze=False)
  vmax = float(maps.max()) or 1.0
  for i in range(rows):
    picture = images[i, ..., 0] if images.shape[-1] == 1 else images[i]
    axes[i, 0].imshow((picture - picture.min()) / (np.ptp(picture) or 1), cmap="gray")
    axes[i, 0].set_title(
      f"{class_names[labels[i]]}\n→ {class_names[predictions[i]]}",
      fontsize=7,
      color="black" if labels[i] == predictions[i] else "red",
    )
    for c in range(classes):
      ax = axes[i, c + 1]
      image = ax.imshow(maps[i, ..., c], cmap="viridis", vmin=0, vmax=vmax)
      if i == 0:
        ax.set_title(class_names[c], fontsize=7)
      frame = "green" if c == labels[i] else "red" if c == predictions[i] else None
      for spine in ax.spines.values():
        spine.set(visible=frame is not None, color=frame or "none", linewidth=2.5)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(image, ax=axes, shrink=0.6, label="map value (after ReLU)")
  if title:
    fig.suptitle(title)
  return fig


def show(fig) -> None:
  """Displays a figure as a PNG output and closes it: the same under any matplotlib backend
  (the tests run with Agg), and never twice (inline would draw it again at the cell's end)."""
  import io as io_lib  # pylint: disable=g-import-not-at-top

  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from IPython.display import Image, display  # pylint: disable=g-import-not-at-top

  buffer = io_lib.BytesIO()
  fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  plt.close(fig)
  display(Image(buffer.getvalue()))


# ----------------------------------------------------------------------------- committed notebooks


def strip_volatile(path: str) -> None:
  """Removes what changes from run to run without changing the results (papermill's timings,
  execution timestamps, kernel versions), so that a rerun diffs only where numbers differ."""
  with open(path) as f:
    notebook = json.load(f)
  notebook["metadata"].pop("papermill", None)
  notebook["metadata"].get("language_info", {}).pop("version", None)
  for cell in notebook["cells"]:
    cell.get("metadata", {}).pop("papermill", None)
    cell.get("metadata", {}).pop("execution", None)
  with open(path, "w") as f:
    json.dump(notebook, f, indent=1, ensure_ascii=False)
    f.write("\n")


README_RESULTS = ("<!-- head_ablation tables: begin -->", "<!-- head_ablation tables: end -->")
_RESULTS_HEADER = "| setting | head |"  # ablation_report.headline_table's first cells.


def ablation_results(notebook_path: str) -> list[str]:
  """The head-ablation notebook's outputs that the README shows: its last cell's headline
  table and conclusion (none while the committed notebook has no outputs)."""
  with open(notebook_path) as f:
    notebook = json.load(f)
  outputs = [o for cell in notebook["cells"] for o in cell.get("outputs", [])]
  texts = ["".join(o.get("data", {}).get("text/markdown", "")).strip() for o in outputs]
  return [t for t in texts if _RESULTS_HEADER in t]


def copy_results_to_readme(notebook_path: str, readme_path: str) -> None:
  """Puts the notebook's results between the README's markers, verbatim."""
  (results,) = ablation_results(notebook_path)
  start, end = README_RESULTS
  with open(readme_path) as f:
    before, rest = f.read().split(start)
  with open(readme_path, "w") as f:
    f.write(before + start + "\n" + results + "\n" + end + rest.split(end)[1])


if __name__ == "__main__":  # python -m nin_jax.analysis strip NOTEBOOK... | readme NOTEBOOK README
  if sys.argv[1:2] == ["strip"] and len(sys.argv) >= 3:
    for notebook_path in sys.argv[2:]:
      strip_volatile(notebook_path)
  elif sys.argv[1:2] == ["readme"] and len(sys.argv) == 4:
    copy_results_to_readme(sys.argv[2], sys.argv[3])
  else:
    sys.exit(
      "usage: python -m nin_jax.analysis strip NOTEBOOK.ipynb... | readme notebooks/head_ablation.ipynb README.md"
    )
