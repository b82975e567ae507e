"""The head ablation's tables, tests and conclusion, computed from its run records alone.

`nin_jax/ablation.py` writes one record per run; everything here reads those records (or
`head_ablation.json`), so the notebook, the README and any later reader see the same
numbers. A failed run (a dead class map, a class never predicted, a divergence) is counted
and listed, never averaged: the means, intervals and paired tests use the healthy runs.
"""

from __future__ import annotations

import re

import numpy as np

from nin_jax import analysis

PAPER_CIFAR10 = {"fc": 11.59, "fc_dropout": 10.88, "gap": 10.41}  # Table 5, test error %.
COMPARISONS = (("gap", "fc"), ("gap", "fc_dropout"))  # The paper's claim: GAP has the lower error.
MIN_SEEDS_TO_TEST = 3  # Healthy seeds a convergence verdict needs.


def last_validation_error(record: dict) -> float:
  """The validation error at the run's last evaluated step (NaN if none). By step, never by
  position: records are written with sorted keys, so "936" follows "3120" in the file."""
  by_step = record["validation_error_by_step"]
  return by_step[max(by_step, key=int)] if by_step else float("nan")


def runs_of(records: list[dict], setting: str, head: str | None = None) -> list[dict]:
  return sorted((r for r in records if r["setting"] == setting and head in (None, r["head"])), key=lambda r: r["seed"])


def healthy(records: list[dict]) -> list[dict]:
  return [r for r in records if not r["failed"]]


def _interval(values: list[float]) -> str:
  if not values:
    return "–"
  mean, low, high = analysis.t_interval(values)
  return f"{mean:.2f}" + (f" [{low:.2f}, {high:.2f}]" if len(values) > 1 else "")


def _mean(values: list[float]) -> str:
  return f"{np.mean(values):.2f}" if values else "–"


def summary_table(records: list[dict], setting: str, heads: list[str], paper: dict | None = None) -> str:
  """Per head: runs and failures, then over the healthy runs the test error's mean and 95%
  t-interval, the train error (whole training split), test - train, and how often the true
  class has the strongest map."""
  header = [
    "head",
    "runs (failed)",
    "test error % [95% CI]",
    "train error %",
    "test − train",
    "true class's map strongest % [95% CI]",
  ] + (["paper, CIFAR-10 %"] if paper else [])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for head in heads:
    mine = runs_of(records, setting, head)
    ok = healthy(mine)
    cells = [
      f"`{head}`",
      f"{len(mine)} ({len(mine) - len(ok)})",
      _interval([r["test_error"] for r in ok]),
      _mean([r["train_error"] for r in ok]),
      _mean([r["test_error"] - r["train_error"] for r in ok]),
      _interval([r["true_class_strongest_map"] for r in ok]),
    ]
    if paper:
      cells.append(f"{paper[head]:.2f}" if head in paper else "")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def map_share_table(records: list[dict], setting: str, heads: list[str]) -> str:
  """Per seed, the share (%) of test images whose true class has the strongest mean map
  (GAP: its accuracy; FC: whether its maps still mean anything per class); failed runs in
  parentheses and left out of the mean and interval."""
  lines = ["| head | per seed | mean [95% CI] |", "|---|---|---|"]
  for head in heads:
    mine = [r for r in runs_of(records, setting, head) if r["true_class_strongest_map"] is not None]
    per_seed = ", ".join(
      (
        f"{r['seed']}: ({r['true_class_strongest_map']:.1f})"
        if r["failed"]
        else f"{r['seed']}: {r['true_class_strongest_map']:.1f}"
      )
      for r in mine
    )
    lines.append(
      f"| `{head}` | {per_seed or '–'} | {_interval([r['true_class_strongest_map'] for r in healthy(mine)])} |"
    )
  return "\n".join(lines)


def paired(records: list[dict], setting: str, a: str, b: str) -> dict | None:
  """Test error of head a minus head b over the seeds where both runs are healthy."""
  by_seed = {h: {r["seed"]: r["test_error"] for r in healthy(runs_of(records, setting, h))} for h in (a, b)}
  seeds = sorted(set(by_seed[a]) & set(by_seed[b]))
  if not seeds:
    return None
  return {**analysis.paired_difference([by_seed[a][s] for s in seeds], [by_seed[b][s] for s in seeds]), "seeds": seeds}


def paired_table(records: list[dict], setting: str) -> str:
  lines = ["| difference (test error, points) | seeds | mean | 95% CI | paired t-test p |", "|---|---|---|---|---|"]
  for a, b in COMPARISONS:
    d = paired(records, setting, a, b)
    if d is None:
      lines.append(f"| `{a}` − `{b}` | 0 | – | – | – |")
      continue
    ci = f"{d['low']:+.2f} to {d['high']:+.2f}" if d["pairs"] > 1 else "–"
    p = f"{d['p_value']:.3g}" if d["pairs"] > 1 else "–"
    lines.append(f"| `{a}` − `{b}` | {d['pairs']} | {d['mean']:+.2f} | {ci} | {p} |")
  return "\n".join(lines)


def convergence(records: list[dict], setting: str, long_setting: str, head: str) -> dict | None:
  """Whether twice the training moves the test error further than the seeds scatter: the
  long run (seed 0) against the 95% prediction interval of the healthy seeds' errors, where
  one more run of the same recipe lands 95 times in 100 (converged when inside). The range
  of the seeds' errors, the ablation's first test, is given too: a sixth draw from an
  unchanged recipe falls outside the range of five 1 time in 3, so with six such checks a
  converged ablation would fail one 91% of the time."""
  errors = [r["test_error"] for r in healthy(runs_of(records, setting, head))]
  long = healthy(runs_of(records, long_setting, head))
  if not errors or not long:
    return None
  _, low, high = analysis.prediction_interval(errors)
  value = long[0]["test_error"]
  return {
    "head": head,
    "long": value,
    "low": low,
    "high": high,
    "seeds": len(errors),
    # With fewer seeds the interval is too wide to fail (t(0.975, 1) = 12.7): no verdict.
    "converged": low <= value <= high if len(errors) >= MIN_SEEDS_TO_TEST else None,
    "min": min(errors),
    "max": max(errors),
    "within_range": min(errors) <= value <= max(errors),
  }


def convergence_table(records: list[dict], setting: str, long_setting: str, heads: list[str]) -> str:
  lines = [
    "| head | seeds' test error range % | 95% prediction interval % | twice as long, seed 0 % "
    "| converged (inside the interval) | inside the range |",
    "|---|---|---|---|---|---|",
  ]
  for head in heads:
    c = convergence(records, setting, long_setting, head)
    lines.append(
      f"| `{head}` | – | – | – | not run | – |"
      if c is None
      else f"| `{head}` | {c['min']:.2f} – {c['max']:.2f} | "
      + (f"{c['low']:.2f} – {c['high']:.2f}" if c["converged"] is not None else "–")
      + f" | {c['long']:.2f} | "
      + {True: "yes", False: "**no**", None: f"too few seeds ({c['seeds']})"}[c["converged"]]
      + f" | {'yes' if c['within_range'] else 'no'} |"
    )
  return "\n".join(lines)


def convergence_caveat(records: list[dict], settings: dict[str, int], heads: list[str]) -> str:
  """The conclusion's last line when any head of any setting is not shown converged: failed
  the test, or untested (no long run yet, or too few seeds for a verdict). Empty otherwise."""
  failed, untested = [], []
  for setting in settings:
    for head in heads:
      c = convergence(records, setting, f"long-{setting}", head)
      if c is None or c["converged"] is None:
        untested.append(f"`{head}` ({setting})")
      elif not c["converged"]:
        failed.append(f"`{head}` ({setting})")
  lines = [f"- Not converged by the test above: {', '.join(failed)}."] if failed else []
  lines += (
    [f"- Convergence not yet tested (no long run, or fewer than {MIN_SEEDS_TO_TEST} seeds): {', '.join(untested)}."]
    if untested
    else []
  )
  return "\n".join(lines)


def diagnosis(record: dict) -> str:
  if record["diverged"]:
    return record["diagnosis"]
  dead = record["dead_classes"]
  parts = [f"class maps zero on every test image: {dead['zero_maps']}"] if dead["zero_maps"] else []
  parts += [f"never predicted: {dead['never_predicted']}"] if dead["never_predicted"] else []
  return "; ".join(parts)


def failures_table(records: list[dict]) -> str:
  """Every failed run with its diagnosis (an empty table says so)."""
  failed = [r for r in records if r["failed"]]
  if not failed:
    return "No run failed."
  lines = ["| run | learning rate | test error % | diagnosis |", "|---|---|---|---|"]
  for r in failed:
    error = "–" if r["test_error"] is None else f"{r['test_error']:.2f}"
    lines.append(f"| `{r['name']}` | {r['learning_rate']:g} | {error} | {diagnosis(r)} |")
  return "\n".join(lines)


def failure_rates(records: list[dict], groups: dict[str, list[str]], head: str = "gap") -> str:
  """Failed / total runs of `head` per group of settings (e.g. the old recipe and the new),
  how many of the failures had a class map dead on every test image (the ReLU failure)
  rather than a class that a live map never made the top score, and Fisher's exact test of
  each group's failure rate against the first group's."""
  lines = [
    f"| recipe | `{head}` runs | failed | of which a dead class map | share failed | p against the first row |",
    "|---|---|---|---|---|---|",
  ]
  counts = []
  for label, settings in groups.items():
    mine = [r for r in records if r["head"] == head and r["setting"] in settings]
    failed = [r for r in mine if r["failed"]]
    counts.append((len(failed), len(mine)))
    dead_maps = sum(bool(r["dead_classes"]["zero_maps"]) for r in failed)
    share = f"{100 * len(failed) / len(mine):.0f}%" if mine else "–"
    p = (
      f"{analysis.failure_rate_p_value(*counts[0], *counts[-1]):.2g}"
      if len(counts) > 1 and mine and counts[0][1]
      else "–"
    )
    lines.append(f"| {label} | {len(mine)} | {len(failed)} | {dead_maps} | {share} | {p} |")
  return "\n".join(lines)


def _class_fate(steps: list[int], shares: list[float]) -> tuple[str, int | None]:
  """How one class map fared over a trace: the steps it was dead at, and the step from which
  it stayed dead to the end (None if it ended alive)."""
  dead = [i for i, share in enumerate(shares) if share == 0]
  if not dead:
    return "", None
  spans, start = [], dead[0]
  for previous, index in zip(dead, [*dead[1:], None]):
    if index != previous + 1:
      spans.append(f"{steps[start]}" if start == previous else f"{steps[start]}–{steps[previous]}")
      start = index
  stayed = dead[-1] == len(shares) - 1
  first_of_last = next(i for i in reversed(dead) if i - 1 not in dead) if stayed else None
  return ", ".join(spans), (steps[first_of_last] if stayed else None)


def trace_table(traces: list[dict]) -> str:
  """Every class map that was dead at some checkpoint of a traced run: the share of test
  images it was alive on at initialisation, the steps it was dead at, and whether it stayed
  dead; with the learning rate at the step it died for good."""
  if not traces:
    return "No failed run with a dead class map to trace."
  lines = [
    "| run | reproduced | class | alive at init (% of images) | dead at steps | died for good at step | lr then |",
    "|---|---|---|---|---|---|---|",
  ]
  for t in traces:
    classes = len(t["alive_share"][0])
    for c, name in enumerate(analysis.class_names(t["config"]["dataset"], classes)[:classes]):
      shares = [a[c] for a in t["alive_share"]]
      spans, for_good = _class_fate(t["steps"], shares)
      if not spans:
        continue
      lr = f"{t['learning_rate'][t['steps'].index(for_good)]:.2g}" if for_good is not None else "–"
      lines.append(
        f"| `{t['name']}` | {'yes' if t['reproduced'] else '**no**'} | {c} {name} | {shares[0]:.1f} | {spans} | "
        f"{for_good if for_good is not None else 'came back'} | {lr} |"
      )
  return "\n".join(lines)


def trace_summary(traces: list[dict]) -> str:
  """One sentence from the traces: the maps that died for good after initialisation (how
  alive they started, by which step and at what learning rate they died), those dead from
  the start, and those that died and came back."""
  died, from_start, came_back = [], 0, 0
  for t in traces:
    for c in range(len(t["alive_share"][0])):
      spans, for_good = _class_fate(t["steps"], [a[c] for a in t["alive_share"]])
      came_back += bool(spans) and for_good is None
      from_start += for_good == 0
      if for_good:
        died.append((for_good, t["learning_rate"][t["steps"].index(for_good)], t["alive_share"][0][c], t["config"]))
  parts = []
  if died:
    step, _, _, config = max(died, key=lambda d: d[0])
    warmup = f" (its warm-up ends at step {config['warmup_steps']})" if config["warmup_steps"] >= 0 else ""
    parts.append(
      f"{len(died)} class maps alive at initialisation (on at least {min(d[2] for d in died):.1f}% of the test "
      f"images) died for good by step {step} of {config['num_train_steps']}{warmup}, at a learning rate of at "
      f"most {max(d[1] for d in died):.2g}"
    )
  if from_start:
    parts.append(f"{from_start} {'was' if from_start == 1 else 'were'} dead at initialisation and never came back")
  if came_back:
    parts.append(f"{came_back} died and came back")
  return "; ".join(parts) + "." if parts else "No traced class map died."


def init_table(alive: dict[str, list[float]], dataset: str, below: float = 5.0) -> str:
  """Per seed, the class maps dead (0%) or alive on fewer than `below`% of the test images at
  initialisation, and how many seeds start with a dead one."""
  if not alive:
    return "No seed was read at initialisation."
  classes = len(next(iter(alive.values())))
  names = analysis.class_names(dataset, classes)[:classes]
  lines = [
    f"| seed | class maps dead at initialisation | alive on fewer than {below:g}% of the images |",
    "|---|---|---|",
  ]
  dead_seeds = 0
  for seed, shares in alive.items():
    dead = [f"{c} {names[c]}" for c, share in enumerate(shares) if share == 0]
    weak = [f"{c} {names[c]} ({share:.1f}%)" for c, share in enumerate(shares) if 0 < share < below]
    dead_seeds += bool(dead)
    if dead or weak:
      lines.append(f"| {seed} | {', '.join(dead) or '–'} | {', '.join(weak) or '–'} |")
  return "\n".join(lines) + f"\n\n{dead_seeds} of {len(alive)} seeds start with a class map dead on every image."


def learning_rate_table(grid: list[dict], heads: list[str], chosen: dict[str, float]) -> str:
  """Final validation error of every grid run, the chosen rate per head in bold."""
  rates = sorted({r["learning_rate"] for r in grid})
  lines = ["| head | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---|" * len(rates)]
  for head in heads:
    cells = []
    for lr in rates:
      found = [r for r in grid if r["head"] == head and r["learning_rate"] == lr]
      if not found:
        cells.append("–")
        continue
      r = found[0]
      text = "failed" if r["failed"] else f"{last_validation_error(r):.2f}"
      cells.append(f"**{text}**" if chosen.get(head) == lr else text)
    lines.append(f"| `{head}` | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def earlier_lengths(records: list[dict], setting: str) -> list[str]:
  """The settings that hold `setting`'s runs at lengths it had before (`<setting>-e<epochs>`,
  filed when a convergence test failed and the setting was lengthened), shortest first."""
  found = {r["setting"] for r in records if re.fullmatch(rf"{re.escape(setting)}-e\d+", r["setting"])}
  return sorted(found, key=lambda s: int(s.rsplit("-e", 1)[1]))


def headline_table(records: list[dict], settings: dict[str, int], heads: list[str]) -> str:
  """The ablation in one table, for the README: per setting and head the runs, the test
  error with its 95% t-interval, and GAP minus that head paired over seeds."""
  lines = [
    "| setting | head | runs (failed) | test error % [95% CI] | `gap` − head, points [95% CI] | paired t-test p |",
    "|---|---|---|---|---|---|",
  ]
  for setting, examples in settings.items():
    runs = runs_of(records, setting)
    length = f", {runs[0]['epochs']:g} epochs" if runs else ""
    for i, head in enumerate(heads):
      mine = runs_of(records, setting, head)
      d = None if head == "gap" else paired(records, setting, "gap", head)
      compared = d is not None and d["pairs"] > 1
      cells = [
        f"{setting} ({examples:,} images{length})" if i == 0 else "",
        f"`{head}`",
        f"{len(mine)} ({len(mine) - len(healthy(mine))})",
        _interval([r["test_error"] for r in healthy(mine)]),
        f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if compared else "–",
        f"{d['p_value']:.3g}" if compared else "–",
      ]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def conclusion(records: list[dict], settings: dict[str, int]) -> str:
  """What the paired differences decide, per setting: only what their intervals support."""
  lines = []
  for setting, examples in settings.items():
    for a, b in COMPARISONS:
      d = paired(records, setting, a, b)
      if d is None or d["pairs"] < 2:
        lines.append(
          f"- **{setting}** ({examples:,} training images): too few paired healthy seeds to compare `{a}` with `{b}`."
        )
        continue
      lines.append(f"- **{setting}** ({examples:,} training images): " + analysis.verdict(f"`{a}`", f"`{b}`", d) + ".")
  failed = sum(r["failed"] for r in records if r["setting"] in settings)
  total = sum(1 for r in records if r["setting"] in settings)
  lines.append(
    f"- {failed} of {total} runs failed and are left out of these comparisons "
    "(the notebook lists them with their diagnosis, under *Failures*)."
  )
  return "\n".join(lines)


def validation_curves(records: list[dict], setting: str, heads: list[str], title: str = ""):
  """Per-epoch validation error per head: each healthy seed thin, the mean thick, and the
  95% t-band of the mean over seeds shaded (runs aligned by step, never by position)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for index, head in enumerate(heads):
    curves = [
      np.array([(int(s), e) for s, e in r["validation_error_by_step"].items()], dtype=float)
      for r in healthy(runs_of(records, setting, head))
    ]
    curves = [c[np.argsort(c[:, 0])] for c in curves if len(c)]
    if not curves:
      continue
    for curve in curves:
      ax.plot(curve[:, 0], curve[:, 1], color=f"C{index}", lw=0.6, alpha=0.4)
    steps, mean = analysis.mean_curve(curves)
    ax.plot(steps, mean, color=f"C{index}", lw=2, label=f"{head} ({len(curves)} seeds)")
    if len(curves) > 1:
      bands = [analysis.t_interval([dict(map(tuple, c))[s] for c in curves]) for s in steps]
      ax.fill_between(steps, [b[1] for b in bands], [b[2] for b in bands], color=f"C{index}", alpha=0.2)
  ax.set(xlabel="step", ylabel="validation error (%)", title=title)
  if ax.lines:
    values = np.concatenate([line.get_ydata() for line in ax.lines])
    ax.set_ylim(max(values.min() - 1, 0), np.percentile(values, 90) + 1)  # Not the first epochs' errors.
    ax.legend()
  else:
    ax.text(0.5, 0.5, "no healthy run yet", ha="center", va="center", transform=ax.transAxes)
  fig.tight_layout()
  return fig
