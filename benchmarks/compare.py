"""The project's train step beside the PyTorch reference's, alternately, in one session.

  python -m benchmarks.compare                       # nin_mnist 64, nin_cifar10 128, nin_imagenet 32
  python -m benchmarks.compare --cases nin_cifar10:128 --rounds 3
  python -m benchmarks.compare --dtype bfloat16         # mixed precision on both sides

Each measurement runs in a process of its own, the two sides alternating (and swapping
order every round) so that neither gets a quieter machine; the table gives each side's
median images/s over the rounds and their ratio (> 1: the project is faster). Run it with
nothing else on the machine. Needs PyTorch:  pip install torch==2.13.0+cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from nin_jax.benchmark import DTYPE_NAMES, FLOPS_PER_MULT_ADD

DEFAULT_CASES = ("nin_mnist:64", "nin_cifar10:128", "nin_imagenet:32")


def _measure(module: str, model: str, batch: int, steps: int, repeats: int, dtype: str) -> dict:
  """The train-step measurement `python -m module` prints (its first JSON line)."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # One CPU device, as a plain run has.
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      module,
      "--model",
      model,
      "--batch_size",
      str(batch),
      "--steps",
      str(steps),
      "--repeats",
      str(repeats),
      "--dtype",
      dtype,
    ],
    capture_output=True,
    text=True,
    check=True,
    env=env,
  ).stdout
  return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def compare(
  cases: list[tuple[str, int]], rounds: int, steps: int, repeats: int, dtype: str = "float32", say=print
) -> list[dict]:
  sides = {"project": "nin_jax.benchmark", "torch": "benchmarks.torch_nin"}
  speeds = {(case, side): [] for case in cases for side in sides}
  peaks, mult_adds = {case: [] for case in cases}, {}
  for r in range(rounds):
    for case in cases:
      for side in sides if r % 2 == 0 else reversed(sides):
        row = _measure(sides[side], *case, steps, repeats, dtype)
        speeds[case, side].append(row["images_per_sec"])
        if side == "project":  # The backend's matmul peak, measured beside each project run.
          peaks[case].append(row["matmul_peak_flops_per_sec"])
          mult_adds[case] = row["mult_adds_per_image"]
        say(f"round {r + 1}/{rounds} {case[0]} b{case[1]} {side}: {speeds[case, side][-1]:.1f} images/s")
  rows = []
  for case in cases:
    project, torch = (statistics.median(speeds[case, side]) for side in sides)
    peak = statistics.median(peaks[case])
    share = lambda images_per_sec: FLOPS_PER_MULT_ADD["train_step"] * mult_adds[case] * images_per_sec / peak  # noqa: B023  (used in this iteration)
    rows.append(
      {
        "model": case[0],
        "batch_size": case[1],
        "dtype": dtype,
        "project_images_per_sec": project,
        "torch_images_per_sec": torch,
        "ratio": project / torch,
        "rounds": rounds,
        "matmul_peak_flops_per_sec": peak,
        "project_fraction_of_peak": share(project),
        "torch_fraction_of_peak": share(torch),
      }
    )
  return rows


def markdown(rows: list[dict]) -> str:
  lines = [
    f"| model, batch (train step, {rows[0]['dtype']}) | project (img/s) | PyTorch (img/s) | ratio "
    "| project, of matmul peak | PyTorch, of matmul peak | matmul peak |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| `{r['model']}`, {r['batch_size']} | {r['project_images_per_sec']:.1f} | "
      f"{r['torch_images_per_sec']:.1f} | {r['ratio']:.2f} | {r['project_fraction_of_peak']:.0%} | "
      f"{r['torch_fraction_of_peak']:.0%} | {r['matmul_peak_flops_per_sec'] / 1e9:.0f} GFLOP/s |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n")[0])
  parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="MODEL:BATCH ...")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
  args = parser.parse_args(argv)
  cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases]
  rows = compare(cases, args.rounds, args.steps, args.repeats, args.dtype)
  print(markdown(rows))
  for r in rows:
    print(json.dumps(r, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
