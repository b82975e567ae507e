"""`python -m nin_jax.benchmark`: how fast the trainer's own train and eval steps run here.

  python -m nin_jax.benchmark --model nin_cifar10 --batch_size 128
  python -m nin_jax.benchmark --model nin_imagenet --batch_size 32 --dtype bfloat16
  python -m nin_jax.benchmark --model nin_mnist --input     # with the real input pipeline

Times the exact jitted steps `train.py` runs (same sharding over every device of every
host, same optimizer state, donated buffers) after compilation and warm-up, and prints one
JSON line per measurement and then a table: images/s, step time (median and spread over
repeats), compile time, and the FLOP/s achieved, counted from the model's own
multiply-add table (x2 FLOPs per multiply-add; x3 for a training step: forward, and the
backward pass's two products per layer) as a share of the peak a large matmul reaches on
the same backend (and, on TPUs and GPUs we know, of the datasheet peak). Synthetic
batches by default; `--input` feeds the config's real data set through its pipeline
(in-memory sets, or tf.data ImageNet when prepared), so input-bound runs show as such.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

# Datasheet dense bf16 peaks per chip (vendors' product pages), by `device_kind`.
DATASHEET_PEAK = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "NVIDIA A100-SXM4-40GB": 312e12,
  "NVIDIA A100-SXM4-80GB": 312e12,
  "NVIDIA H100 80GB HBM3": 989e12,
}
# FLOPs per multiply-add of the model's table: x2 per product, x3 for a training step's passes.
FLOPS_PER_MULT_ADD = {"train_step": 6, "eval_step": 2}
# models.DTYPES' names, written out so that parsing arguments imports no JAX before the flags are set.
DTYPE_NAMES = ("float32", "bfloat16")
MODEL_DATASETS = {
  "nin_mnist": "fashion_mnist",
  "nin_cifar10": "cifar10",
  "nin_cifar100": "cifar100",
  "nin_svhn": "svhn",
  "nin_imagenet": "imagenet2012",
}


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m nin_jax.benchmark", description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="nin_cifar10", choices=sorted(MODEL_DATASETS))
  parser.add_argument("--batch_size", type=int, default=128, help="Global batch, over every device.")
  parser.add_argument("--steps", type=int, default=10, help="Steps per timed repeat.")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=3, help="Untimed steps after compilation.")
  parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
  parser.add_argument("--head", default="gap", choices=["gap", "fc", "fc_dropout"])
  parser.add_argument("--image_size", type=int, default=0, help="0: the model's.")
  parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
  parser.add_argument("--input", action="store_true", help="Feed the model's data set through the real pipeline.")
  parser.add_argument("--dataset", default="", help="With --input: the data set (default: the model's).")
  parser.add_argument(
    "--no_fast_cpu_fusions",
    action="store_true",
    help="Leave XLA:CPU's YNNPACK fusions off (with NIN_JAX_ONEDNN=0: the plain path).",
  )
  args = parser.parse_args(argv)
  for name in ("batch_size", "steps", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1")
  if args.warmup < 0:
    parser.error("--warmup must be at least 0")
  return args


def _config(args):
  from nin_jax import configs  # pylint: disable=g-import-not-at-top

  c = configs.default_config()
  c.update(
    dict(
      model=args.model,
      head=args.head,
      dtype=args.dtype,
      batch_size=args.batch_size,
      eval_batch_size=args.batch_size,
      optimizer=args.optimizer,
      schedule="constant",
      learning_rate=1e-3,
      num_train_steps=10**6,
      log_every_steps=10**6,
      eval_every_steps=-1,
      dataset=(args.dataset or MODEL_DATASETS[args.model]) if args.input else "synthetic",
      eval_examples=args.batch_size,
      image_size=args.image_size,
    )
  )
  return c


def _timed(run_steps, repeats: int) -> list[float]:
  """Seconds of each repeat of `run_steps()` (which blocks until its results exist)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run_steps()
    times.append(time.perf_counter() - start)
  return times


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an n x n matmul on the default backend: what the hardware gives dense math here.

  Where the layers run on oneDNN, the faster of XLA's matmul and oneDNN's (as a 1x1
  convolution, on the kernels a layer of `dtype` takes here): XLA:CPU does not use AMX
  tiles, so its bfloat16 matmul understates the peak.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from nin_jax.model import dtype_probe, onednn  # pylint: disable=g-import-not-at-top

  a = jnp.ones((n, n), dtype)
  squares = [jax.jit(lambda x: x @ x)]
  if onednn.used_for(dtype):
    f32 = dtype_probe.float32_kernels_for(dtype)
    one_by_one = lambda x: onednn.conv_relu(
      x[None, None], x[None, None], x[0], (1, 1), ((0, 0),) * 2, float32_kernels=f32
    )
    squares.append(jax.jit(one_by_one))
  best = float("inf")
  for square in squares:
    square(a).block_until_ready()
    best = min(best, *_timed(lambda: square(a).block_until_ready(), repeats))  # noqa: B023  (timed here)
  return 2 * n**3 / best


def _train_measurement(trainer, job, args) -> tuple[dict, object]:
  import jax  # pylint: disable=g-import-not-at-top

  from nin_jax import train  # pylint: disable=g-import-not-at-top

  state = trainer.init_state()
  if args.input:  # The real pipeline, batches prepared on the host as the step runs.
    source = train.prefetch(job.data.train_batches(0), job.put)
    next_batch = lambda: next(source)[:2]
  else:  # One batch, already on the devices: compute alone.
    batch = next(iter(job.data.train_batches(0)))
    fixed = (job.put(batch.images), job.put(batch.labels))
    next_batch = lambda: fixed
  start = time.perf_counter()
  compiled = trainer.train_step.lower(state, *next_batch()).compile()
  compile_seconds = time.perf_counter() - start
  box = {"state": state}

  def run(count):
    for _ in range(count):
      box["state"], box["metrics"] = compiled(box["state"], *next_batch())
    jax.block_until_ready(box)

  run(args.warmup)
  times = _timed(lambda: run(args.steps), args.repeats)
  return _measurement("train_step", times, compile_seconds, args), box["state"]


def _eval_measurement(trainer, job, state, args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  batch = next(iter(job.data.eval_batches()))
  images, labels, mask = job.put(batch.images), job.put(batch.labels), job.put(batch.mask)
  start = time.perf_counter()
  compiled = trainer.eval_step.lower(state["params"], images, labels, mask).compile()
  compile_seconds = time.perf_counter() - start

  def run(count):
    outs = [compiled(state["params"], images, labels, mask) for _ in range(count)]
    jax.block_until_ready(outs)

  run(args.warmup)
  return _measurement("eval_step", _timed(lambda: run(args.steps), args.repeats), compile_seconds, args)


def _measurement(kind: str, times: list[float], compile_seconds: float, args) -> dict:
  step_times = [t / args.steps for t in times]
  median = statistics.median(step_times)
  return {
    "measure": kind,
    "step_seconds_median": median,
    "step_seconds_min": min(step_times),
    "step_seconds_max": max(step_times),
    "images_per_sec": args.batch_size / median,
    "compile_seconds": compile_seconds,
    "repeats": args.repeats,
    "steps_per_repeat": args.steps,
  }


def run(args) -> list[dict]:
  """Every measurement of one benchmark, as dicts (also printed as JSON lines)."""
  if not args.no_fast_cpu_fusions:
    from nin_jax.main import use_fast_cpu_fusions  # pylint: disable=g-import-not-at-top

    use_fast_cpu_fusions()
  from nin_jax import host_memory  # pylint: disable=g-import-not-at-top

  config = _config(args)
  host_memory.keep_for(config)  # Before JAX starts its threads.
  import jax  # pylint: disable=g-import-not-at-top

  from nin_jax import job as job_lib  # pylint: disable=g-import-not-at-top
  from nin_jax import train
  from nin_jax.model import models, onednn
  from nin_jax.run import reporting

  with tempfile.TemporaryDirectory() as workdir:
    job = job_lib.make_job(config, workdir, None)
    trainer = train.Trainer(job, reporting.Reporter(job.workdir, total_steps=1, enabled=False))
    mult_adds = models.total_mult_adds(nnx_model(job), job.model.image_size)
    devices = job.devices
    context = {
      "model": args.model,
      "head": args.head,
      "dtype": args.dtype,
      "batch_size": args.batch_size,
      "image_size": job.model.image_size,
      "input": config.dataset,
      "backend": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "devices": len(devices),
      "hosts": jax.process_count(),
      "mult_adds_per_image": mult_adds,
      "layers": "onednn" if onednn.used_for(args.dtype) else "xla",
    }
    train_row, state = _train_measurement(trainer, job, args)
    eval_row = _eval_measurement(trainer, job, state, args)
  # FLOP/s count every host's images, so the peak does too: accelerators add up per device; CPU
  # "devices" (--xla_force_host_platform_device_count) share their host's cores, hosts add up.
  per_host = 1 if devices[0].platform == "cpu" else len(jax.local_devices())
  peak = matmul_peak(args.dtype) * per_host * jax.process_count()
  datasheet = DATASHEET_PEAK.get(devices[0].device_kind)
  results = []
  for row in (train_row, eval_row):
    flops = FLOPS_PER_MULT_ADD[row["measure"]] * mult_adds * row["images_per_sec"]
    row = {
      **context,
      **row,
      "flops_per_sec": flops,
      "matmul_peak_flops_per_sec": peak,
      "fraction_of_matmul_peak": flops / peak,
    }
    if datasheet:
      row["fraction_of_datasheet_peak"] = flops / (datasheet * len(devices))
    results.append(row)
  return results


def nnx_model(job):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return nnx.eval_shape(lambda: job.model.build(nnx.Rngs(0)))


_LAYERS = {"onednn": "oneDNN", "xla": "XLA"}


def table(results: list[dict]) -> str:
  lines = [
    f"{'measure':<11} {'images/s':>9} {'step ms (min-max)':>22} {'compile s':>9} {'GFLOP/s':>9} {'of matmul peak':>14}"
  ]
  for r in results:
    spread = (
      f"{1e3 * r['step_seconds_median']:.1f} ({1e3 * r['step_seconds_min']:.1f}-{1e3 * r['step_seconds_max']:.1f})"
    )
    lines.append(
      f"{r['measure']:<11} {r['images_per_sec']:>9.1f} {spread:>22} {r['compile_seconds']:>9.1f} "
      f"{r['flops_per_sec'] / 1e9:>9.1f} {100 * r['fraction_of_matmul_peak']:>13.0f}%"
    )
  first = results[0]
  lines.append(
    f"{first['model']}/{first['head']} {first['dtype']}, batch {first['batch_size']} at "
    f"{first['image_size']} px, input {first['input']}, {first['devices']} {first['backend']} "
    f"device(s) ({first['device_kind']}), layers on {_LAYERS[first['layers']]}; "
    f"matmul peak {first['matmul_peak_flops_per_sec'] / 1e9:.0f} GFLOP/s"
  )
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  from nin_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  try:
    results = run(args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code
  for r in results:
    print(json.dumps(r, sort_keys=True))
  print(table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
