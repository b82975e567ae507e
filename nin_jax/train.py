"""The trainer: the state, one jitted sharded train step, exact evaluation, and the loop.

`train_and_evaluate(config, workdir)` is the whole job; `main.py` only parses flags.
The global batch is sharded over a 1-D `data` mesh of every device of every host,
parameters are replicated, and the train state is created already sharded and
donated to each step. Dropout keys are `fold_in(key, step)` and batches are a
function of (seed, step), so a resumed run repeats the uninterrupted one exactly.

The host never waits for the device between log steps: train metrics stay on the
device until a log or checkpoint step fetches them, the next batch is on the device
while the current step runs, and hosts agree on preemption without a per-step
collective (`preemption.py`). Every device-to-host transfer happens inside
`_host_sync()`; the tests run training under a transfer guard to prove it.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nin_jax import job as job_lib
from nin_jax import lineage, optim, train_metrics
from nin_jax.data import batches as batches_lib
from nin_jax.errors import Interrupted, WorkdirLost
from nin_jax.model import dtype_probe, onednn
from nin_jax.run import checkpointing, lock, preemption, reporting
from nin_jax.run import workdir as workdir_lib


def _host_sync():
  """The only places where device values reach the host: log, checkpoint and eval steps."""
  return jax.transfer_guard_device_to_host("allow")


# ----------------------------------------------------------------------------- steps


def _correct_counts(logits: jax.Array, labels: jax.Array, mask: jax.Array, top5: bool):
  top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask
  out = {"correct": top1.sum()}
  if top5:
    in_top5 = (jax.lax.top_k(logits, 5)[1] == labels[:, None]).any(-1).astype(jnp.float32) * mask
    out["correct_top5"] = in_top5.sum()
  return out


def make_train_step(
  graphdef, tx: optax.GradientTransformation, *, seed: int, num_classes: int, label_smoothing: float, top5: bool
):
  def train_step(state, images, labels):
    step = state["step"]
    # Derived inside the step: a key made outside would be a constant read back from the device.
    dropout_root = jax.random.fold_in(jax.random.key(seed), 1)

    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(images, train=True, dropout_key=jax.random.fold_in(dropout_root, step))
      targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
      return optax.softmax_cross_entropy(logits, targets).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **_correct_counts(logits, labels, jnp.ones_like(loss, shape=labels.shape), top5)}
    return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

  return train_step


def make_eval_step(graphdef, *, top5: bool):
  def eval_step(params, images, labels, mask):
    logits = nnx.merge(graphdef, params)(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"loss_sum": (loss * mask).sum(), "count": mask.sum(), **_correct_counts(logits, labels, mask, top5)}

  return eval_step


def evaluate(eval_step, params, batches: Iterator[batches_lib.Batch], put: Callable, top5: bool) -> dict[str, float]:
  """Top-1 (top-5) accuracy and loss over every real example; padding rows have mask 0."""
  sums: dict[str, float] = collections.defaultdict(float)
  for batch in batches:
    out = eval_step(params, put(batch.images), put(batch.labels), put(batch.mask))
    for k, v in jax.device_get(out).items():
      sums[k] += float(v)
  count = int(sums["count"])
  metrics = {"eval_accuracy": sums["correct"] / count, "eval_loss": sums["loss_sum"] / count, "eval_examples": count}
  if top5:
    metrics["eval_top5_accuracy"] = sums["correct_top5"] / count
  return metrics


def prefetch(batches: Iterator[batches_lib.Batch], put: Callable, size: int = 2):
  """(images, labels) as global device arrays, `size` batches ahead of the step that uses
  them, and the count of undecodable images skipped so far (host side)."""
  queue = collections.deque()
  for batch in batches:
    queue.append((put(batch.images), put(batch.labels), batch.skipped))
    if len(queue) == size:
      yield queue.popleft()


# ----------------------------------------------------------------------------- the trainer


class Trainer:
  """The state and the steps of one job, and the actions of the loop."""

  def __init__(self, job: job_lib.Job, reporter: reporting.Reporter):
    self.job, self.reporter, c = job, reporter, job.config
    replicated = NamedSharding(job.mesh, P())
    batch = NamedSharding(job.mesh, P("data"))
    self.graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: job.model.build(nnx.Rngs(0))))
    self.num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract_params))
    self.tx, self.schedule = optim.from_config(c, job.model.spec, abstract_params, job.num_steps, job.steps_per_epoch)
    abstract = jax.eval_shape(self._init_state)
    self.state_sharding = jax.tree.map(lambda _: replicated, abstract)
    self.abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
    self.train_step = jax.jit(
      make_train_step(
        self.graphdef,
        self.tx,
        seed=c.seed,
        num_classes=job.model.spec.num_classes,
        label_smoothing=c.label_smoothing,
        top5=job.top5,
      ),
      in_shardings=(self.state_sharding, batch, batch),
      out_shardings=(self.state_sharding, replicated),
      donate_argnums=0,
    )
    self.all_finite = jax.jit(
      lambda tree: jnp.all(
        jnp.stack(  # Every float of the state, on device.
          [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
        )
      )
    )
    self.eval_step = jax.jit(
      make_eval_step(self.graphdef, top5=job.top5),
      in_shardings=(self.state_sharding["params"], batch, batch, batch),
      out_shardings=replicated,
    )

  def _init_state(self):
    params = nnx.state(self.job.model.initial(), nnx.Param)
    return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}

  def init_state(self):
    return jax.jit(self._init_state, out_shardings=self.state_sharding)()  # Created already sharded.

  def evaluate(self, state, step: int) -> dict[str, float]:
    metrics = evaluate(self.eval_step, state["params"], self.job.data.eval_batches(), self.job.put, self.job.top5)
    self.reporter.write(step, metrics)
    self.reporter.print(
      f"eval at step {step}: top-1 {100 * metrics['eval_accuracy']:.2f}% "
      + (f"top-5 {100 * metrics['eval_top5_accuracy']:.2f}% " if self.job.top5 else "")
      + f"loss {metrics['eval_loss']:.4f} on {metrics['eval_examples']:,} examples"
    )
    return metrics

  def log(self, step: int, metrics: train_metrics.TrainMetrics, seconds: float, images: int, skipped: int) -> None:
    logged = {
      **metrics.summary(self.job.config.batch_size, self.job.top5),
      "learning_rate": float(self.schedule(step - 1)),
      "images_per_sec": images / seconds,
      "epoch": step / self.job.steps_per_epoch,
      **({"skipped_images": skipped} if skipped else {}),
    }  # Undecodable files, this host.
    self.reporter.write(step, logged)
    self.reporter.progress(step, logged, steps_per_second=images / seconds / self.job.config.batch_size)


def _due(step: int, every: int, last: int) -> bool:
  return step % every == 0 or step == last


def train_loop(
  trainer: Trainer,
  state,
  start_step: int,
  saved: dict,
  manager: checkpointing.ocp.CheckpointManager,
  on_first_save: Callable[[], None] | None = None,
  held: lock.WorkdirLock | None = None,
) -> dict[str, float]:
  """Steps from `start_step` to the end; returns the last evaluation's metrics. Stops,
  saving nothing, if another run took the workdir's lock over (`held.lost`)."""
  job, c, reporter = trainer.job, trainer.job.config, trainer.reporter
  metrics = train_metrics.TrainMetrics(
    saved,
    num_classes=job.model.spec.num_classes,
    stuck_loss_steps=c.stuck_loss_steps,
    say=reporter.print,
    diverged=lambda what: checkpointing.diverged_error(what, manager),
  )
  batches = prefetch(job.data.train_batches(start_step), job.put)
  eval_metrics = {}
  tick, images = time.perf_counter(), 0
  with preemption.StopRequest(reporter.print) as stop:
    for step in range(start_step + 1, job.num_steps + 1):
      images_on_device, labels_on_device, skipped = next(batches)
      state, step_metrics = trainer.train_step(state, images_on_device, labels_on_device)
      metrics.pending.append(step_metrics)
      images += c.batch_size
      stopping = stop.requested(step)
      if held is not None and held.lost:
        raise WorkdirLost(
          f"Stopped at step {step} without saving: another run took over {job.workdir}; "
          "its checkpoints are now that run's. Use another --workdir for this one."
        )
      with _host_sync():
        if _due(step, c.log_every_steps, job.num_steps):
          metrics.fetch(step)
          trainer.log(step, metrics, time.perf_counter() - tick, images, skipped)
          tick, images = time.perf_counter(), 0
        if _due(step, c.checkpoint_every_steps, job.num_steps) or stopping:
          metrics.fetch(step)  # A diverged state is never saved...
          if not bool(trainer.all_finite(state)):  # ...nor one whose numbers overflowed.
            raise checkpointing.diverged_error(
              f"The parameters or optimizer state became non-finite by step {step}", manager
            )
          checkpointing.save(manager, step, state, metrics.host_state())
          if on_first_save is not None:
            on_first_save()
            on_first_save = None
        if stopping:
          raise Interrupted(
            f"Stopped by {stop.signal.name} at step {step}; checkpoint saved. Run the same command to resume.",
            stop.signal,
          )
        if _due(step, job.eval_every, job.num_steps):
          pause = time.perf_counter()
          eval_metrics = trainer.evaluate(state, step)
          tick += time.perf_counter() - pause  # Evaluation time is not training throughput.
  return eval_metrics


def _finished(trainer: Trainer, state) -> dict[str, float]:
  """A rerun of a finished run: the final evaluation on record, else a new one."""
  job, reporter = trainer.job, trainer.reporter
  reporter.print(
    f"nothing left to train: the checkpoint at step {job.num_steps} ends this config's "
    f"{job.num_steps:,} steps (raise --config.num_train_steps or num_epochs to train longer)."
  )
  recorded = {}
  if reporter.enabled:
    finals = [r for r in reporter.log.records() if r["step"] == job.num_steps and "eval_accuracy" in r]
    recorded = {k: v for k, v in finals[-1].items() if k != "step"} if finals else {}
  if jax.process_count() > 1:  # Host 0's log decides, so that every host evaluates or none.
    if bool(multihost_utils.broadcast_one_to_all(np.array(bool(recorded)))):
      return recorded
  elif recorded:
    return recorded
  with _host_sync():
    return trainer.evaluate(state, job.num_steps)


def _describe(job: job_lib.Job) -> str:
  c = job.config
  return (
    f"{c.model}/{c.head} on {c.dataset}: {job.data.num_train_examples:,} train and "
    f"{job.data.num_eval_examples:,} eval examples, {job.num_steps:,} steps of {c.batch_size} "
    f"({job.num_steps / job.steps_per_epoch:.2f} epochs) on {len(job.devices)} "
    f"{job.devices[0].platform} device(s), {jax.process_count()} host(s)"
    + (", layers on oneDNN" if onednn.used_for(c.dtype) else "")
    + (
      f", bfloat16 layers on {dtype_probe.bfloat16_kernels()}"
      if jnp.dtype(c.dtype) == jnp.bfloat16 and job.devices[0].platform == "cpu"
      else ""
    )
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, devices: list[jax.Device] | None = None
) -> dict[str, float]:
  """Trains and evaluates as `config` says, writing everything to `workdir` (a local
  path or a URL such as gs://bucket/run).

  Resumes from the latest complete checkpoint in `workdir`. Returns the final
  evaluation metrics. Raises a `UserError` subclass for anything the user can fix.
  `devices` (default: all devices of all hosts) form the `data` mesh axis.
  """
  path = workdir_lib.prepare(workdir)
  # One writer per workdir: the run's first host holds the lock for all of its hosts.
  with lock.WorkdirLock(path) if jax.process_index() == 0 else contextlib.nullcontext() as held:
    return _run(config, path, devices, held)


def _run(config: ml_collections.ConfigDict, workdir, devices, held: lock.WorkdirLock | None) -> dict[str, float]:
  job = job_lib.make_job(config, workdir, devices)
  is_main = jax.process_index() == 0
  reporter = reporting.Reporter(job.workdir, total_steps=job.num_steps, enabled=is_main)
  manager = checkpointing.make_manager(job.workdir, keep=job.config.keep_checkpoints)
  try:  # Also on errors and interrupts: flush the logs, finish any save.
    trainer = Trainer(job, reporter)
    restore_step = job.config.restore_step if job.config.restore_step >= 0 else None
    if restore_step is not None and lineage.branch_taken(job.workdir, restore_step):
      reporter.print(f"the branch from step {restore_step} (restore_step) was taken already: resuming it.")
      restore_step = None
    latest = manager.latest_step()
    state, saved, start_step = checkpointing.restore(
      manager, trainer.abstract_state, warn=reporter.print, wanted=restore_step
    )
    if state is None:
      state, saved = trainer.init_state(), {}
      reporter.print(f"starting from scratch: {trainer.num_params:,} parameters")
    else:
      reporter.print(f"resumed from the checkpoint at step {start_step}")
    branched = restore_step is not None and restore_step < latest

    def record():
      if is_main:
        lineage.record(job.workdir, job.config, job.config_changes, start_step, say=reporter.print, branched=branched)

    if branched:  # The abandoned steps go, and the branch is recorded, when it saves its first.
      later = [s for s in manager.all_steps() if s > start_step]
      reporter.print(
        f"branching from step {start_step} as asked (restore_step): the later checkpoints "
        f"(steps {', '.join(map(str, sorted(later)))}) are kept until this run saves its first."
      )
    else:
      record()
    reporter.print(_describe(job))
    for note in job.data.notes:
      reporter.print(note)
    advice = dtype_probe.slow_dtype_advice(job.config.dtype, job.devices[0].platform)
    if advice:
      reporter.print(advice)
    if start_step >= job.num_steps:
      final = _finished(trainer, state)
    else:
      if is_main:
        workdir_lib.remove_final(job.workdir)  # Of a shorter run this one continues.
      reporter.resume_at(start_step)  # One line per step in metrics.jsonl.
      final = train_loop(
        trainer, state, start_step, saved, manager, on_first_save=record if branched else None, held=held
      )
    if is_main:
      workdir_lib.write_final(job.workdir, job.num_steps, final)
    return final
  finally:
    manager.close()
    reporter.close()
