"""What the notebooks compute: finished runs as tables, the last block's class maps, plots.

The notebooks (`notebooks/head_ablation.py`, `notebooks/class_maps.py`) tell the story;
everything they compute lives here, where it is tested. Runs are ordinary workdirs:
their `metrics.jsonl` and `config.json` are the only inputs.
"""

from __future__ import annotations

import dataclasses
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

from nin_jax import datasets, input_pipeline, lineage, models


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
  return Run(name or str(workdir), config["head"], int(config["seed"]),
             one_line_per_step([json.loads(line) for line in lines if line.strip()]))


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


def _mean_std(values: list[float]) -> tuple[float, float]:
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[Run], train_errors: dict[str, float], head_params: dict[str, tuple[int, int]]):
  """One row per head: test error mean and std (sample std over seeds) and each seed's, the
  train error at the end, their gap, and the head's and the model's parameter counts.

  `train_errors` maps a run's name to its error (%) on training images in eval mode;
  `head_params` maps a head to (parameters of the head, parameters in total).
  """
  rows = []
  for head in dict.fromkeys(r.head for r in runs):
    mine = sorted((r for r in runs if r.head == head), key=lambda r: r.seed)
    test = [r.test_error for r in mine]
    train = [train_errors[r.name] for r in mine]
    gap = [t - e for t, e in zip(test, train)]
    rows.append(dict(head=head, head_params=head_params[head][0], total_params=head_params[head][1],
                     seeds=[r.seed for r in mine], test_errors=test, test_error=_mean_std(test),
                     train_error=_mean_std(train), gap=_mean_std(gap)))
  return rows


def markdown_table(rows: list[dict], paper: dict[str, float] | None = None) -> str:
  """The summary as a Markdown table; `paper` adds the paper's test error per head."""
  header = ["head", "head params", "total params", "test error % (mean ± std)", "per seed",
            "train error %", "test − train"]
  if paper:
    header.append("paper, CIFAR-10 (test error %)")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [f"`{r['head']}`", f"{r['head_params']:,}", f"{r['total_params']:,}",
             "{:.2f} ± {:.2f}".format(*r["test_error"]), ", ".join(f"{e:.2f}" for e in r["test_errors"]),
             "{:.2f} ± {:.2f}".format(*r["train_error"]), "{:.2f} ± {:.2f}".format(*r["gap"])]
    if paper:
      cells.append(f"{paper[r['head']]:.2f}" if r["head"] in paper else "")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def head_parameters(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(parameters of the classifier head, parameters in total) of the config's model."""
  model = nnx.eval_shape(lambda: models.from_config(config).build(nnx.Rngs(0)))
  count = lambda state: sum(math.prod(x.shape) for x in jax.tree.leaves(state))
  total = count(nnx.state(model, nnx.Param))
  head = count(nnx.state(model.classifier, nnx.Param)) if model.classifier is not None else 0
  return head, total


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
  logits = _predict(model, images, batch_size)
  return 100 * float(np.mean(logits.argmax(-1) != labels))


@nnx.jit
def _logits(model, x):
  return model(x)


def _predict(model, images: np.ndarray, batch_size: int) -> np.ndarray:
  return np.concatenate([np.asarray(_logits(model, jnp.asarray(images[i:i + batch_size])))
                         for i in range(0, len(images), batch_size)])


def class_maps(model: models.NIN, images: np.ndarray, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
  """(maps, logits): the output of the last mlpconv layer after its ReLU, one map per class
  (N, H, W, classes), and the model's logits for the same images."""
  last = models.layer_names(model.spec)[-1][-1]
  maps, logits = [], []

  def hook(name, y, module):
    if name == last:
      maps.append(np.asarray(y, np.float32))

  for start in range(0, len(images), batch_size):
    logits.append(np.asarray(model(jnp.asarray(images[start:start + batch_size]), hook=hook)))
  return np.concatenate(maps), np.concatenate(logits)


def _compare(a: dict, b: dict) -> str:
  """How much lower a's mean test error is than b's, and whether that exceeds the seeds' spread."""
  delta = b["test_error"][0] - a["test_error"][0]
  said = f"`{a['head']}` {'beats' if delta > 0 else 'trails'} `{b['head']}` by {abs(delta):.2f} points"
  if min(len(a["seeds"]), len(b["seeds"])) < 2:
    return said + " (one seed: no spread to weigh it against)"
  spread = math.hypot(a["test_error"][1], b["test_error"][1])
  return said + f", {'more than' if abs(delta) > spread else 'within'} the seed-to-seed spread ({spread:.2f})"


def conclusion(summaries: dict[str, list[dict]], settings: dict[str, int]) -> str:
  """A few sentences on the ablation, computed from its tables: which head wins in each
  setting and by how much against the spread over seeds, which head overfits least, and
  whether GAP's margin over FC grows when data is scarce (the paper's regulariser claim)."""
  lines, margins = [], {}
  for setting, rows in summaries.items():
    by_head = {r["head"]: r for r in rows}
    best = min(rows, key=lambda r: r["test_error"][0])
    others = "; ".join(_compare(best, r) for r in rows if r is not best)
    tightest = min(rows, key=lambda r: r["gap"][0])
    lines.append(f"- **{setting}** ({settings[setting]:,} training images): lowest test error `{best['head']}` "
                 f"({best['test_error'][0]:.2f}%); {others}. Smallest test − train gap: `{tightest['head']}` "
                 f"({tightest['gap'][0]:.2f} points).")
    if "gap" in by_head and "fc" in by_head:
      margins[setting] = by_head["fc"]["test_error"][0] - by_head["gap"]["test_error"][0]
  if len(margins) == 2:
    (big, big_margin), (small, small_margin) = sorted(margins.items(), key=lambda kv: -settings[kv[0]])
    trend = "grows" if small_margin > big_margin else "does not grow"
    lines.append(f"- GAP's margin over FC is {big_margin:+.2f} points with {settings[big]:,} images and "
                 f"{small_margin:+.2f} with {settings[small]:,}: it {trend} when data is scarce, which "
                 + ("supports" if small_margin > big_margin and small_margin > 0 else "does not support")
                 + " the paper's reading of GAP as a structural regulariser here.")
  lines.append("- One data set, one budget, few seeds: differences within the spread are not evidence either way.")
  return "\n".join(lines)


def mean_curve(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(steps, mean value) over the steps every curve (rows of step, value) has: aligned by
  step, never by position, so a run that logged more or fewer points shifts nothing."""
  common = sorted(set.intersection(*(set(c[:, 0].tolist()) for c in curves)))
  values = [dict(zip(c[:, 0].tolist(), c[:, 1].tolist())) for c in curves]
  return np.array(common), np.array([statistics.fmean(v[s] for v in values) for s in common])


# ----------------------------------------------------------------------------- statistics


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high): the mean and its Student-t confidence interval over `values` (seeds)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  mean = statistics.fmean(values)
  if len(values) < 2:
    return mean, float("nan"), float("nan")
  half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
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


def verdict(name_a: str, name_b: str, difference: dict) -> str:
  """What a paired error difference (a - b, in points) decides: a is better (lower error) or
  worse when its interval excludes 0, else the two are not distinguishable at this power."""
  said = (f"{difference['mean']:+.2f} points (95% CI {difference['low']:+.2f} to {difference['high']:+.2f}, "
          f"paired t-test p = {difference['p_value']:.3g}, {difference['pairs']} seeds)")
  if difference["high"] < 0:
    return f"{name_a} is better than {name_b}: {said}"
  if difference["low"] > 0:
    return f"{name_a} is worse than {name_b}: {said}"
  return f"{name_a} and {name_b} are not distinguishable at this power: {said}"


def dead_classes(maps: np.ndarray, logits: np.ndarray) -> dict[str, list[int]]:
  """The failure a GAP head can suffer: classes whose map (after its ReLU) is zero on every
  image, so their logit is 0 forever, and classes the model never predicts on these images.
  `maps` is (N, H, W, classes) or None (an FC head has no class maps); `logits` (N, classes)."""
  classes = logits.shape[-1]
  never_predicted = sorted(set(range(classes)) - set(np.argmax(logits, -1).tolist()))
  zero_maps = [] if maps is None else [int(c) for c in np.flatnonzero(maps.reshape(-1, classes).max(0) <= 0)]
  return {"never_predicted": never_predicted, "zero_maps": zero_maps}


# ----------------------------------------------------------------------------- plots


def plot_learning_curves(runs: list[Run], title: str = ""):
  """Train loss and test error against steps: a colour per head, seeds thin, their mean thick."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (loss_ax, error_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
  for index, head in enumerate(dict.fromkeys(r.head for r in runs)):
    colour = f"C{index}"
    mine = [r for r in runs if r.head == head]
    for key, ax, read in [("train", loss_ax, lambda r: (r["step"], r["train_loss"])),
                          ("evals", error_ax, lambda r: (r["step"], 100 * (1 - r["eval_accuracy"])))]:
      curves = [np.array([read(x) for x in getattr(run, key)]) for run in mine]
      for curve in curves:
        ax.plot(curve[:, 0], curve[:, 1], color=colour, lw=0.7, alpha=0.5)
      steps, mean = mean_curve(curves)
      ax.plot(steps, mean, color=colour, lw=2.2, label=head)
  loss_ax.set(xlabel="step", ylabel="train loss", title="train loss")
  error_ax.set(xlabel="step", ylabel="test error (%)", title="test error")
  error_ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_class_maps(images: np.ndarray, maps: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                    class_names: list[str], title: str = ""):
  """Each image beside its per-class maps on one colour scale; the true class's map framed
  in green, a wrong prediction's in red (the paper's Figure 4)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows, classes = len(images), maps.shape[-1]
  fig, axes = plt.subplots(rows, classes + 1, figsize=(1.25 * (classes + 1), 1.35 * rows), squeeze=False)
  vmax = float(maps.max()) or 1.0
  for i in range(rows):
    picture = images[i, ..., 0] if images.shape[-1] == 1 else images[i]
    axes[i, 0].imshow((picture - picture.min()) / (np.ptp(picture) or 1), cmap="gray")
    axes[i, 0].set_title(f"{class_names[labels[i]]}\n→ {class_names[predictions[i]]}", fontsize=7,
                         color="black" if labels[i] == predictions[i] else "red")
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


if __name__ == "__main__":  # python -m nin_jax.analysis strip NOTEBOOK...
  if sys.argv[1:2] != ["strip"] or len(sys.argv) < 3:
    sys.exit("usage: python -m nin_jax.analysis strip NOTEBOOK.ipynb...")
  for notebook_path in sys.argv[2:]:
    strip_volatile(notebook_path)
